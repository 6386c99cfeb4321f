-- dovenotify: Dovecot push_notification Lua driver (Dovecot 2.3 and 2.4).
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
-- mail uid. So: never raise into Dovecot, never wait longer than the timeout,
-- and keep the top level cheap (the file is loaded for every mail user, twice
-- per LMTP delivery).
--
-- Settings (2.3: plugin { ... }; 2.4: push_notification lua { lua_settings { ... } }):
--   dovenotify_socket      event socket path   (default /run/dovenotify/events.sock)
--   dovenotify_timeout     seconds, per send   (default 0.2)
--   dovenotify_user_field  optional userdb field whose value replaces the username
--   dovenotify_spool       file to append the lines to when they cannot be sent
--                          (default /var/lib/dovenotify/events.spool); dovenotify
--                          creates it writable for us and pushes for them when back

local DEFAULT_SOCKET = "/run/dovenotify/events.sock"
local DEFAULT_TIMEOUT = 0.2
local DEFAULT_SPOOL = "/var/lib/dovenotify/events.spool"

-- Per Lua state (one per mail user in a process): filled by script_init on 2.4,
-- on the first transaction on 2.3 where settings come from the user.
local settings = nil
-- lua-socket's unix module, loaded on the first send so that processes
-- which never send an event never load it.
local unix = nil

local ESCAPES = { ["%"] = "%25", ["\t"] = "%09", ["\r"] = "%0D", ["\n"] = "%0A" }

local function escape(text)
  return (string.gsub(tostring(text or ""), "[%%\t\r\n]", ESCAPES))
end

local function make_settings(get)
  local timeout = tonumber(get("dovenotify_timeout") or "")
  if timeout == nil or timeout <= 0 then
    timeout = DEFAULT_TIMEOUT
  end
  local socket_path = get("dovenotify_socket")
  if socket_path == nil or socket_path == "" then
    socket_path = DEFAULT_SOCKET
  end
  local spool = get("dovenotify_spool")
  if spool == nil or spool == "" then
    spool = DEFAULT_SPOOL
  end
  local field = get("dovenotify_user_field")
  -- The name goes into a %{userdb:...} expansion on 2.4: allow plain names only.
  if field ~= nil and not string.match(field, "^[%w_.-]+$") then
    field = nil
  end
  return { socket = socket_path, timeout = timeout, user_field = field, spool = spool }
end

-- 2.3 calls script_init() without arguments and insists on an integer 0;
-- 2.4 passes lua_settings as a table and ignores the result.
function script_init(args)
  if type(args) == "table" then
    settings = make_settings(function(name) return args[name] end)
  end
  return 0
end

local function user_settings(user)
  if settings == nil then
    if user.plugin_getenv ~= nil then
      settings = make_settings(function(name) return user:plugin_getenv(name) end)
    else
      settings = make_settings(function() return nil end)
    end
  end
  return settings
end

local function username_of(user, s)
  if s.user_field ~= nil then
    local ok, value
    if user.plugin_getenv ~= nil then
      -- 2.3: userdb extra fields are visible as plugin settings.
      ok, value = pcall(user.plugin_getenv, user, s.user_field)
    else
      ok, value = pcall(user.var_expand, user, "%{userdb:" .. s.user_field .. "}")
    end
    if ok and type(value) == "string" and value ~= "" then
      return value
    end
  end
  return user.username
end

function dovecot_lua_notify_begin_txn(user)
  local s = user_settings(user)
  return {
    prefix = "\t" .. escape(username_of(user, s)) .. "\t",
    suffix = "\t" .. escape(user.service) .. "\n",
    lines = {},
    seen = {},
    settings = s,
  }
end

local function add(ctx, name, mailbox, extra)
  local line = name .. ctx.prefix .. escape(mailbox) .. ctx.suffix
  if extra ~= nil then
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
dovecot_lua_notify_event_message_new = hook("MessageNew")
dovecot_lua_notify_event_message_append = hook("MessageAppend")
dovecot_lua_notify_event_message_expunge = hook("MessageExpunge")
dovecot_lua_notify_event_flags_set = hook("FlagsSet")
dovecot_lua_notify_event_mailbox_delete = hook("MailboxDelete")

function dovecot_lua_notify_event_flags_clear(ctx, event)
  -- Dovecot reports a FlagsClear with nothing in it whenever \Recent goes away
  -- (e.g. on STORE +FLAGS \Seen): flags is then an empty table and keywords
  -- is absent or empty. Nothing changed that a client can see.
  local flags, keywords = event.flags, event.keywords
  if (flags == nil or #flags == 0) and (keywords == nil or #keywords == 0) then
    return
  end
  add(ctx, "FlagsClear", event.mailbox)
end

function dovecot_lua_notify_event_mailbox_rename(ctx, event)
  add(ctx, "MailboxRename", event.mailbox, event.mailbox_old or "")
end

-- Lua 5.4 keeps the handles of loaded C libraries in this registry table, in
-- load order; closing the state unloads each. nil where that is not so.
local function loaded_c_libraries()
  local ok, registry = pcall(debug.getregistry)
  local clibs = ok and type(registry) == "table" and registry._CLIBS
  return type(clibs) == "table" and clibs or nil
end

-- Returns nil on success, else a reason for the log.
local function send(data, s)
  if unix == nil then
    local clibs = loaded_c_libraries()
    local before = clibs and #clibs
    local ok, module = pcall(require, "socket.unix")
    if not ok then
      return "cannot load lua-socket (socket.unix): " .. tostring(module)
    end
    unix = module
    -- Closing a Lua state unloads the C libraries it loaded (dlclose), and LMTP
    -- makes fresh states for every delivery: loading lua-socket again each time
    -- was most of what this script cost a delivery. Forgetting our handle keeps
    -- the library in the process, so later states only take another reference.
    if before ~= nil then
      for i = #clibs, before + 1, -1 do
        clibs[i] = nil
      end
    end
  end
  local conn, err = (unix.stream or unix)()
  if conn == nil then
    return "socket: " .. tostring(err)
  end
  -- "b" bounds each blocking step, "t" the whole call: together no step and
  -- no sequence of partial sends can wait longer than the timeout.
  conn:settimeout(s.timeout, "b")
  conn:settimeout(s.timeout, "t")
  local ok
  ok, err = conn:connect(s.socket)
  if ok then
    local sent, send_err, last = conn:send(data)
    if sent == nil then
      err = "send: " .. tostring(send_err) .. " after " .. tostring(math.floor(last or 0)) .. " of "
        .. #data .. " bytes"
    else
      err = nil
    end
  else
    err = "connect: " .. tostring(err)
  end
  conn:close()
  return err
end

-- Appends the lines to the spool for the service to push when it is back.
-- Returns nil on success, else a reason for the log.
local function keep(data, s)
  local file, err = io.open(s.spool, "a")
  if file == nil then
    return err
  end
  -- A buffer as big as the data makes one write(2) on an O_APPEND file, so
  -- lines of concurrent writers never interleave.
  file:setvbuf("full", #data)
  local ok, write_err = file:write(data)
  local closed, close_err = file:close()
  if not ok or not closed then
    return tostring(write_err or close_err)
  end
  return nil
end

function dovecot_lua_notify_end_txn(ctx, success)
  if not success or #ctx.lines == 0 then
    return
  end
  local data = table.concat(ctx.lines)
  local ok, err = pcall(send, data, ctx.settings)
  if ok and err == nil then
    return
  end
  local kept_ok, kept_err = pcall(keep, data, ctx.settings)
  local outcome
  if kept_ok and kept_err == nil then
    outcome = "kept in " .. ctx.settings.spool
  else
    outcome = "not kept in " .. ctx.settings.spool .. " either: " .. tostring(kept_err)
  end
  pcall(dovecot.i_warning, string.format(
    "dovenotify: %d event(s) not sent to %s: %s; %s",
    #ctx.lines, ctx.settings.socket, tostring(err), outcome))
end
