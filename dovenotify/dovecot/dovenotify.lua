-- dovenotify: Dovecot push_notification Lua driver (Dovecot 2.3 and 2.4).
-- What it does, and its settings: dovenotify-driver.lua beside this file.
--
-- Dovecot compiles this file into a fresh Lua state for every mail user (every
-- LMTP delivery), and compiling is most of what a script costs a delivery:
-- each line of code here costs every delivery; comments cost nothing. So this
-- file only runs dovenotify-driver.luac, the driver precompiled on this
-- machine by `dovenotify dovecot-config --install`. Without it, or when Lua
-- refuses it (bytecode of another Lua version: run --install again after an
-- upgrade), dovenotify-loader.lua warns and loads the source instead.
--
-- An error raised here (no driver at all) is safe: Dovecot logs it, delivers
-- the mail, and runs no hook for that user. One raised in a hook is not
-- (dovenotify-driver.lua says why).

local base = string.match(debug.getinfo(1, "S").source, "^@(.*)%.lua$")
local driver = loadfile(base .. "-driver.luac", "b") or assert(loadfile(base .. "-loader.lua", "t"))(base)
-- It defines Dovecot's hooks as globals: Dovecot looks for them once this
-- file has run, and collects only the events that have one.
driver(base)
