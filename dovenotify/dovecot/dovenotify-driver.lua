-- dovenotify: the push_notification Lua driver's code (Dovecot 2.3 and 2.4).
--
-- dovenotify.lua, the script Dovecot is configured with, runs this chunk when
-- Dovecot loads it (from dovenotify-driver.luac, this file precompiled on the
-- machine, or from this file), passing the path of the installed files without
-- ".lua". After editing this file, run `dovenotify dovecot-config --install`
-- (or delete the .luac): the bytecode is used first. Each line of code here
-- costs every delivery; what only a failure needs is in dovenotify-fallback.lua.
--
-- Each mail transaction's distinct events are appended, one line each, to the
-- file of the mail process's uid in dovenotify's spool directory, which the
-- service watches and reads as lines arrive:
--
--     <EventName> TAB <username> TAB <mailbox> TAB <service> [TAB <more>] LF
--
-- `%`, TAB, CR and LF in username and mailbox are written as %25 %09 %0D %0A.
-- MailboxRename appends the escaped old name as a fifth field. Readers must
-- ignore fields they do not know, so fields can be added later.
--
-- An append is a few system calls, no connection and no library to load: the
-- driver costs a delivery little more than Dovecot's Lua driver does with
-- hooks that do nothing (README: What it costs each delivery). Only when the
-- append fails (no file for this uid yet, a full file, no spool directory)
-- does dovenotify-fallback.lua load, and send the lines to the event socket.
--
-- This runs inside Dovecot's imap/lmtp/lda processes, synchronously, as the
-- mail uid. So: never wait, and never raise from a hook: that makes Dovecot
-- (2.3.19 and 2.4.1) panic the process after it saved the mail, and the LMTP
-- client, seeing the connection drop, delivers the mail again.
--
-- Settings (2.3: plugin { ... }; 2.4: push_notification lua { lua_settings { ... } }):
--   dovenotify_spool       the spool directory, one file per uid (default
--                          /var/lib/dovenotify/events.spool); the service creates it
--   dovenotify_spool_size  bytes one uid's file may grow to while the service is
--                          away (default 1048576)
--   dovenotify_user_field  optional userdb field whose value replaces the username
--   dovenotify_socket      the event socket, when the spool fails (default
--                          /run/dovenotify/events.sock)
--   dovenotify_timeout     seconds, per send to the socket (default 0.2)

local base = ...
-- 2.4's lua_settings (script_init's argument); on 2.3 settings are read from
-- the mail user. The spool's settings are read at the first transaction.
local args, spool, spool_size, user_field

-- 2.3 calls script_init() without arguments and insists on an integer 0.
function script_init(settings)
  args = type(settings) == "table" and settings
  return 0
end

-- An unset setting is nil on 2.3, and may be "" on 2.4.
local function setting(user, name)
  local value
  if args then
    value = args[name]
  elseif user.plugin_getenv then
    value = user:plugin_getenv(name)
  end
  -- Always one value: tonumber() of none raises.
  return value ~= "" and value or nil
end

local ESCAPES = { ["%"] = "%25", ["\t"] = "%09", ["\r"] = "%0D", ["\n"] = "%0A" }

local function escape(text)
  return (string.gsub(tostring(text or ""), "[%%\t\r\n]", ESCAPES))
end

-- The username from userdb field `user_field` (dovenotify_user_field), if set.
local function field_value(user)
  local ok, value
  if user.plugin_getenv then
    -- 2.3: userdb extra fields are visible as plugin settings.
    ok, value = pcall(user.plugin_getenv, user, user_field)
  elseif string.match(user_field, "^[%w_.-]+$") then
    -- 2.4: the name goes into an expansion, so plain names only.
    ok, value = pcall(user.var_expand, user, "%{userdb:" .. user_field .. "}")
  end
  if ok and type(value) == "string" and value ~= "" then
    return value
  end
end

function dovecot_lua_notify_begin_txn(user)
  if not spool then
    spool = setting(user, "dovenotify_spool") or "/var/lib/dovenotify/events.spool"
    spool_size = tonumber(setting(user, "dovenotify_spool_size"))
    spool_size = spool_size and spool_size > 0 and spool_size or 1048576
    user_field = setting(user, "dovenotify_user_field")
  end
  local name = user_field and field_value(user) or user.username
  return {
    prefix = "\t" .. escape(name) .. "\t",
    suffix = "\t" .. escape(user.service) .. "\n",
    lines = {},
    seen = {},
    -- %d: Lua 5.4 gives the uid as a float (65534.0).
    path = spool .. string.format("/%d", tonumber(user.uid) or -1),
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
dovecot_lua_notify_event_message_new = hook("MessageNew")
dovecot_lua_notify_event_message_append = hook("MessageAppend")
dovecot_lua_notify_event_message_expunge = hook("MessageExpunge")
dovecot_lua_notify_event_flags_set = hook("FlagsSet")
dovecot_lua_notify_event_mailbox_delete = hook("MailboxDelete")

-- Dovecot reports a FlagsClear with nothing in it whenever \Recent goes away
-- (e.g. on STORE +FLAGS \Seen): flags is then an empty table and keywords is
-- absent or empty. Nothing changed that a client can see.
function dovecot_lua_notify_event_flags_clear(ctx, event)
  local flags, keywords = event.flags, event.keywords
  if (flags and #flags > 0) or (keywords and #keywords > 0) then
    add(ctx, "FlagsClear", event.mailbox)
  end
end

function dovecot_lua_notify_event_mailbox_rename(ctx, event)
  add(ctx, "MailboxRename", event.mailbox, event.mailbox_old or "")
end

-- Appends `data` to the uid's file (which only this uid may write) unless that
-- would take it past spool_size; returns nil, or why not and the file's size.
local function append(path, data)
  local file, err = io.open(path, "a")
  if not file then
    return err
  end
  local size = file:seek("end")
  if not size or size + #data > spool_size then
    file:close()
    return "full", size
  end
  -- A buffer as big as the data makes one write(2) on an O_APPEND file, so
  -- lines of concurrent writers never interleave.
  file:setvbuf("full", #data)
  local written, write_err = file:write(data)
  local closed, close_err = file:close()
  if not (written and closed) then
    return tostring(write_err or close_err), size
  end
end

function dovecot_lua_notify_end_txn(ctx, success)
  if not success or #ctx.lines == 0 then
    return
  end
  local data = table.concat(ctx.lines)
  local done, problem, size = pcall(append, ctx.path, data)
  if done and not problem then
    return
  end
  local fallback, err = loadfile(base .. "-fallback.lua", "t")
  if fallback then
    done, err = pcall(fallback, ctx, data, tostring(problem), size, spool_size, setting)
  end
  if err then
    pcall(dovecot.i_error, string.format("dovenotify: %d event(s) lost: cannot append to %s"
      .. " (%s), and then: %s", #ctx.lines, ctx.path, tostring(problem), tostring(err)))
  end
end
