-- dovenotify: Dovecot push_notification Lua driver (Dovecot 2.3 and 2.4).
-- What it sends, and its settings: dovenotify-driver.lua beside this file.
--
-- Dovecot compiles this file for every mail user it creates, twice per LMTP
-- delivery, and compiling code was most of what the driver cost a delivery
-- (comments and strings cost next to nothing). So this file only forwards the
-- hooks to the driver, loaded at a user's first transaction: from
-- dovenotify-driver.luac, precompiled on this machine by `dovenotify
-- dovecot-config --install`, or else from dovenotify-driver.lua.

local this, args, driver = debug.getinfo(1, "fS"), nil, nil

-- 2.3 calls script_init() without arguments and insists on an integer 0;
-- 2.4 passes lua_settings as a table and ignores the result.
function script_init(settings)
  args = settings
  return 0
end

-- Bytecode runs only on the Lua that made it. Lua checks its own version and
-- number formats; the installer puts this file, compiled by the Lua it used,
-- in front of the driver's bytecode, so a Lua that compiles code differently
-- (an upgrade) does not match, and the source is used. Kept as text, like
-- the comments: compiled only where a transaction needs the driver.
local LOAD_DRIVER = [[
  local this, args = ...
  local path = string.match(this.source, "^@(.*)%.lua$") .. "-driver.lua"
  local file, chunk, err = io.open(path .. "c", "rb"), nil, "compiled by another Lua"
  if file then
    local data, mine = file:read("a") or "", string.dump(this.func, true)
    file:close()
    if string.sub(data, 1, #mine) == mine then
      chunk, err = load(string.sub(data, #mine + 1), "=" .. path .. "c", "b")
    end
    if not chunk then
      dovecot.i_warning("dovenotify: " .. path .. "c does not load (" .. tostring(err)
        .. "); using the source instead, which is slower: "
        .. "run `dovenotify dovecot-config --install` again")
    end
  end
  return (chunk or assert(loadfile(path, "t")))(args)
]]

function dovecot_lua_notify_begin_txn(user)
  driver = driver or assert(load(LOAD_DRIVER, "=dovenotify.lua:LOAD_DRIVER"))(this, args)
  return driver.begin_txn(user)
end

-- Dovecot collects only the events whose hook exists when it loads the script.
for _, hook in ipairs({
  "event_message_new", "event_message_append", "event_message_expunge", "event_flags_set",
  "event_flags_clear", "event_mailbox_delete", "event_mailbox_rename", "end_txn",
}) do
  _G["dovecot_lua_notify_" .. hook] = function(ctx, value)
    driver[hook](ctx, value)
  end
end
