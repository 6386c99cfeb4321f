-- dovenotify: Dovecot push_notification Lua driver (Dovecot 2.3 and 2.4).
-- What it sends, and its settings: dovenotify-driver.lua beside this file.
--
-- Dovecot compiles this file into a fresh Lua state for every mail user (every
-- LMTP delivery), and compiling code is most of what a script costs a delivery;
-- comments and strings cost next to nothing. So this file only forwards the
-- hooks to the driver, loaded at a user's first transaction from
-- dovenotify-driver.luac, the driver precompiled on this machine by `dovenotify
-- dovecot-config --install`, or else from dovenotify-driver.lua. Lua refuses
-- bytecode of another Lua version or number format (after an upgrade: run
-- --install again); then the source is used, with a warning.

local path = string.match(debug.getinfo(1, "S").source, "^@(.*)%.lua$") .. "-driver.lua"
local args, driver

-- 2.3 calls script_init() without arguments and insists on an integer 0;
-- 2.4 passes lua_settings as a table and ignores the result.
function script_init(settings)
  args = settings
  return 0
end

local function load_driver()
  local chunk, err = loadfile(path .. "c", "b")
  if not chunk and not string.find(err, "^cannot open") then
    dovecot.i_warning(string.format("dovenotify: %s does not load (%s); using the source "
      .. "instead, which is slower: run `dovenotify dovecot-config --install` again", path .. "c", err))
  end
  if not chunk then
    chunk, err = loadfile(path, "t")
    if not chunk then
      error("dovenotify: " .. err .. "; run `dovenotify dovecot-config --install`", 0)
    end
  end
  return chunk(args)
end

-- An error raised from a hook makes Dovecot (2.3.19 and 2.4.1) panic the
-- process after it saved the mail: the LMTP client sees the connection drop
-- and delivers the mail again. So without a driver every hook does nothing.
local NOTHING = setmetatable({}, { __index = function() return function() return {} end end })

function dovecot_lua_notify_begin_txn(user)
  if not driver then
    local loaded, result = pcall(load_driver)
    if not loaded then
      dovecot.i_error(tostring(result))
    end
    driver = loaded and result or NOTHING
  end
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
