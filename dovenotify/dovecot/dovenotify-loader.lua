-- dovenotify: loads the Lua driver from source, for dovenotify.lua, when its
-- bytecode (dovenotify-driver.luac) is missing or Lua refuses it. Says which
-- in Dovecot's log, since the source costs each delivery more.

local base = ...
local _, problem = loadfile(base .. "-driver.luac", "b")
if problem and not string.find(problem, "^cannot open") then
  dovecot.i_warning("dovenotify: " .. problem .. "; using the source instead, which is"
    .. " slower: run `dovenotify dovecot-config --install` again")
end
local driver, err = loadfile(base .. "-driver.lua", "t")
if not driver then
  error("dovenotify: " .. err .. "; run `dovenotify dovecot-config --install`", 0)
end
return driver
