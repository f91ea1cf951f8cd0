-- wrk script for benches/e2e.sh's reference client: every key in $KEYS
-- (one request path per line) is fetched once, the keys dealt out between
-- wrk's threads in turn ($THREADS, wrk's -t; $CONNECTIONS, its -c).
--
-- No response() callback: with one, wrk copies every body into a Lua
-- string. Instead wrk calls delay() before every request of a connection
-- (its first one too): delay() promises the next key of the thread's
-- share, or, with the share all promised, keeps the connection waiting for
-- good. Once every connection of the thread waits, the thread has all its
-- answers. wrk also calls the first thread's request() once before any
-- connection (to check the request parses): a call no delay() promised
-- takes no key. wrk itself runs for its -d duration
-- whatever its threads do, so each thread that is done adds a line to
-- $DONE, and the one that finds every thread's line there ends wrk.
local keys = {}
for line in io.lines(os.getenv("KEYS")) do
    keys[#keys + 1] = line
end
local threads = tonumber(os.getenv("THREADS"))
-- wrk gives each thread connections / threads of them.
local connections = math.floor(tonumber(os.getenv("CONNECTIONS")) / threads)
local next_id = 0

function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
end

function init(args)
    next_key = id + 1
    share = 0
    for _ = id + 1, #keys, threads do
        share = share + 1
    end
    promised = 0
    unsent = 0
    waiting = 0
end

function delay()
    if promised < share then
        promised = promised + 1
        unsent = unsent + 1
        return 0
    end
    waiting = waiting + 1
    if waiting == connections then
        local done = io.open(os.getenv("DONE"), "a")
        done:write("done\n")
        done:close()
        local lines = 0
        for _ in io.lines(os.getenv("DONE")) do
            lines = lines + 1
        end
        if lines >= threads then
            os.exit(0)
        end
    end
    return 3600000
end

function request()
    local key = keys[next_key]
    if unsent > 0 then
        unsent = unsent - 1
        next_key = next_key + threads
    end
    return wrk.format("GET", key)
end
