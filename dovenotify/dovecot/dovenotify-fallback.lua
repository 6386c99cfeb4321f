-- dovenotify: what the Lua driver does when it cannot append a transaction's
-- lines to its uid's spool file: send them to the event socket instead, and
-- failing that, leave word for the service and say so in Dovecot's log.
--
-- dovenotify-driver.lua loads this from source, and only then: the file does
-- not exist yet (the service makes one per uid, at the uid's first event on
-- the socket), or it is full because the service has been away.

local ctx, data, problem, size, spool_size, setting = ...
local count = #ctx.lines
local socket_path = setting(ctx.user, "dovenotify_socket") or "/run/dovenotify/events.sock"
local timeout = tonumber(setting(ctx.user, "dovenotify_timeout"))
timeout = timeout and timeout > 0 and timeout or 0.2
if problem == "full" then
  problem = "it is full (dovenotify_spool_size)"
end

-- lua-socket's unix module: its C library alone, found along package.cpath
-- (require would first try eight socket/unix.lua paths, in every fresh state).
local function load_unix()
  -- Closing a Lua state unloads the C libraries it loaded (dlclose), and LMTP
  -- makes a fresh state for every delivery: where every event goes this way
  -- (a filesystem without ACLs), loading lua-socket anew each time would cost
  -- most. Lua 5.4 keeps the handles in the registry table _CLIBS, in load
  -- order: forgetting ours keeps the library in the process, so later states
  -- only take another reference. (Other Lua versions keep them elsewhere:
  -- there the library is loaded each time.)
  local clibs = debug.getregistry()._CLIBS or {}
  local before = #clibs
  local open, err = package.loadlib(
    package.searchpath("socket.unix", package.cpath) or "socket.unix", "luaopen_socket_unix")
  if not open then
    error("cannot load lua-socket (socket.unix): " .. tostring(err), 0)
  end
  for i = #clibs, before + 1, -1 do
    clibs[i] = nil
  end
  return open()
end

-- Returns nil on success, else a reason for the log.
local function send()
  local conn, err = load_unix().stream()
  if not conn then
    return "socket: " .. tostring(err)
  end
  -- "b" bounds each blocking step, "t" the whole call: together no step and
  -- no sequence of partial sends can wait longer than the timeout.
  conn:settimeout(timeout, "b")
  conn:settimeout(timeout, "t")
  local done, last
  done, err = conn:connect(socket_path)
  if not done then
    err = "connect: " .. tostring(err)
  else
    done, err, last = conn:send(data)
    err = not done and string.format("send: %s after %d of %d bytes", err, last or 0, #data)
  end
  conn:close()
  return err or nil
end

local sent, failure = pcall(send)
failure = not sent and tostring(failure) or failure
if not failure then
  -- Expected once per uid (its file is made then); the service logs what else.
  dovecot.i_debug(string.format("dovenotify: cannot append to %s (%s); sent %d event(s) to %s",
    ctx.path, problem, count, socket_path))
  return
end

-- Neither way works: the service is away. If the file is merely full, one
-- short line past its size has the service push every device of this uid when
-- it is back; lines past that are then not needed.
local outcome = "lost"
if size and size <= spool_size then
  local file = io.open(ctx.path, "a")
  if file then
    file:setvbuf("full", 1024)
    local written = file:write("SpoolFull" .. ctx.prefix .. ctx.suffix)
    if file:close() and written then
      outcome = "dovenotify will push every device of this uid when it is back"
    end
  end
elseif size then
  outcome = "dovenotify will push every device of this uid when it is back"
end
dovecot.i_warning(string.format(
  "dovenotify: %d event(s) not sent: cannot append to %s (%s) nor send to %s (%s); %s",
  count, ctx.path, problem, socket_path, failure, outcome))
