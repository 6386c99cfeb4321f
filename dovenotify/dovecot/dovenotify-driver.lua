-- dovenotify: the push_notification Lua driver's code (Dovecot 2.3 and 2.4).
--
-- dovenotify.lua, the script Dovecot is configured with, loads this chunk at
-- the first transaction of a mail user (from dovenotify-driver.luac, this file
-- precompiled on the machine, or from this file) and forwards each hook to the
-- function of the same name it returns. The chunk gets script_init's argument:
-- on 2.4 the lua_settings. After editing this file, run `dovenotify
-- dovecot-config --install` (or delete the .luac): the bytecode is used first.
--
-- Sends one line per distinct event of a mail transaction to the dovenotify
-- service over a unix stream socket:
--
--     <EventName> TAB <username> TAB <mailbox> TAB <service> [TAB <more>] LF
--
-- `%`, TAB, CR and LF in username and mailbox are sent as %25 %09 %0D %0A.
-- MailboxRename appends the escaped old name as a fifth field. Receivers must
-- ignore fields they do not know, so fields can be added later.
--
-- This runs inside Dovecot's imap/lmtp/lda processes, synchronously, as the
-- mail uid. So: never raise into Dovecot, never wait longer than the timeout.
--
-- Dovecot makes a fresh Lua state for every mail user (every LMTP delivery).
-- Code a delivery does not run is kept in strings and compiled where it is
-- first needed (see `lazy`): that keeps the bytecode small and the source
-- fallback cheap.
--
-- Settings (2.3: plugin { ... }; 2.4: push_notification lua { lua_settings { ... } }):
--   dovenotify_socket      event socket path   (default /run/dovenotify/events.sock)
--   dovenotify_timeout     seconds, per send   (default 0.2)
--   dovenotify_user_field  optional userdb field whose value replaces the username
--   dovenotify_spool       directory where the lines go, one file per uid, when
--                          they cannot be sent (default /var/lib/dovenotify/events.spool);
--                          dovenotify creates it and pushes for them when back
--   dovenotify_spool_size  bytes one uid's spool file may grow to (default 1048576)

local args = ...
-- Per Lua state: from args on 2.4, on the first transaction on 2.3 where
-- settings come from the user.
local settings
-- lua-socket's unix module, loaded on the first send.
local unix

-- Chunks compiled on first use; each gets the arguments of `lazy(name, ...)`.
local CHUNKS = {
  -- The username from userdb field `field` (dovenotify_user_field), if set.
  username = [[
    local user, field = ...
    local ok, value
    if user.plugin_getenv then
      -- 2.3: userdb extra fields are visible as plugin settings.
      ok, value = pcall(user.plugin_getenv, user, field)
    elseif string.match(field, "^[%w_.-]+$") then
      -- 2.4: the name goes into an expansion, so plain names only.
      ok, value = pcall(user.var_expand, user, "%{userdb:" .. field .. "}")
    end
    if ok and type(value) == "string" and value ~= "" then
      return value
    end
    return user.username
  ]],
  -- Dovecot reports a FlagsClear with nothing in it whenever \Recent goes
  -- away (e.g. on STORE +FLAGS \Seen): flags is then an empty table and
  -- keywords is absent or empty. Nothing changed that a client can see.
  visible_flags_cleared = [[
    local event = ...
    local flags, keywords = event.flags, event.keywords
    return (flags ~= nil and #flags > 0) or (keywords ~= nil and #keywords > 0)
  ]],
  -- After a failed send: append the lines to this uid's file in the spool
  -- directory, for the service to push when it is back, and say so in Dovecot's
  -- log. The file is ours alone (the directory's default ACL makes it 0640 and
  -- only the service's group reads it); past spool_size we stop appending, after
  -- one SpoolFull line that has the service push every device we may push.
  keep = [[
    local data, count, s, reason, ctx = ...
    -- %d: Lua 5.4 gives the uid as a float (65534.0).
    local path = s.spool .. "/" .. string.format("%d", ctx.user.uid)
    local outcome = "kept in " .. path
    local file, err = io.open(path, "a")
    if file then
      local size = file:seek("end") or 0
      local written, write_err = true, nil
      if size >= s.spool_size then
        outcome = "not kept: " .. path .. " is full (dovenotify_spool_size); dovenotify"
          .. " will push every device of this uid when it is back"
      else
        if size + #data > s.spool_size then
          data, outcome = "SpoolFull" .. ctx.prefix .. ctx.suffix, path .. " is now full"
        end
        -- A buffer as big as the data makes one write(2) on an O_APPEND file,
        -- so lines of concurrent writers never interleave.
        file:setvbuf("full", #data)
        written, write_err = file:write(data)
      end
      local closed, close_err = file:close()
      err = not (written and closed) and tostring(write_err or close_err)
    end
    if err then
      outcome = "not kept in " .. path .. " either: " .. err
    end
    dovecot.i_warning(string.format("dovenotify: %d event(s) not sent to %s: %s; %s",
      count, s.socket, reason, outcome))
  ]],
}

local function lazy(name, ...)
  local chunk = CHUNKS[name]
  if type(chunk) == "string" then
    chunk = assert(load(chunk, "=dovenotify-driver.lua:" .. name))
    CHUNKS[name] = chunk
  end
  return chunk(...)
end

local function make_settings(get)
  -- An unset setting is nil on 2.3, and may be "" on 2.4.
  local function value(name)
    local text = get(name)
    if text == "" then
      return nil
    end
    return text
  end
  local timeout = tonumber(value("dovenotify_timeout"))
  local spool_size = tonumber(value("dovenotify_spool_size"))
  return {
    socket = value("dovenotify_socket") or "/run/dovenotify/events.sock",
    timeout = timeout and timeout > 0 and timeout or 0.2,
    spool = value("dovenotify_spool") or "/var/lib/dovenotify/events.spool",
    spool_size = spool_size and spool_size > 0 and spool_size or 1048576,
    user_field = value("dovenotify_user_field"),
  }
end

-- 2.3 calls script_init() without arguments; 2.4 passes lua_settings as a table.
if type(args) == "table" then
  settings = make_settings(function(name) return args[name] end)
end

local ESCAPES = { ["%"] = "%25", ["\t"] = "%09", ["\r"] = "%0D", ["\n"] = "%0A" }

local function escape(text)
  return (string.gsub(tostring(text or ""), "[%%\t\r\n]", ESCAPES))
end

-- The driver's functions, under the names of Dovecot's hooks without their
-- dovecot_lua_notify_ prefix: dovenotify.lua forwards each hook to its own.
local driver = {}

function driver.begin_txn(user)
  settings = settings or make_settings(function(name)
    return user.plugin_getenv and user:plugin_getenv(name)
  end)
  local name = settings.user_field and lazy("username", user, settings.user_field)
  return {
    prefix = "\t" .. escape(name or user.username) .. "\t",
    suffix = "\t" .. escape(user.service) .. "\n",
    lines = {},
    seen = {},
    user = user,
  }
end

local function add(ctx, name, mailbox, extra)
  local line = name .. ctx.prefix .. escape(mailbox) .. ctx.suffix
  if extra then
    line = string.sub(line, 1, -2) .. "\t" .. escape(extra) .. "\n"
  end
  if not ctx.seen[line] then
    ctx.seen[line] = true
    ctx.lines[#ctx.lines + 1] = line
  end
end

-- One hook per event the service acts on (MailboxCreate is not one: a new
-- mailbox is empty and nobody registered it; Dovecot skips unhooked events).
local function hook(name)
  return function(ctx, event)
    add(ctx, name, event.mailbox)
  end
end
driver.event_message_new = hook("MessageNew")
driver.event_message_append = hook("MessageAppend")
driver.event_message_expunge = hook("MessageExpunge")
driver.event_flags_set = hook("FlagsSet")
driver.event_mailbox_delete = hook("MailboxDelete")

function driver.event_flags_clear(ctx, event)
  if lazy("visible_flags_cleared", event) then
    add(ctx, "FlagsClear", event.mailbox)
  end
end

function driver.event_mailbox_rename(ctx, event)
  add(ctx, "MailboxRename", event.mailbox, event.mailbox_old or "")
end

-- lua-socket's unix module: its C library alone, found along package.cpath
-- (require would first try eight socket/unix.lua paths, in every fresh state).
local function load_unix()
  -- Closing a Lua state unloads the C libraries it loaded (dlclose), and LMTP
  -- makes a fresh state for every delivery: loading lua-socket anew each time
  -- was what this script cost most. Lua 5.4 keeps the handles in the registry
  -- table _CLIBS, in load order: forgetting ours keeps the library in the
  -- process, so later states only take another reference. (Other Lua
  -- versions keep them elsewhere: there the library is loaded each time.)
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
local function send(data)
  unix = unix or load_unix()
  local conn, err = unix.stream()
  if not conn then
    return "socket: " .. tostring(err)
  end
  -- "b" bounds each blocking step, "t" the whole call: together no step and
  -- no sequence of partial sends can wait longer than the timeout.
  conn:settimeout(settings.timeout, "b")
  conn:settimeout(settings.timeout, "t")
  local done, last
  done, err = conn:connect(settings.socket)
  if not done then
    err = "connect: " .. tostring(err)
  else
    done, err, last = conn:send(data)
    err = not done and string.format("send: %s after %d of %d bytes", err, last or 0, #data)
  end
  conn:close()
  return err or nil
end

function driver.end_txn(ctx, success)
  if not success or #ctx.lines == 0 then
    return
  end
  local data = table.concat(ctx.lines)
  local ok, err = pcall(send, data)
  if not ok or err then
    pcall(lazy, "keep", data, #ctx.lines, settings, tostring(err), ctx)
  end
end

return driver
