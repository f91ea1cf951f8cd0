-- wrk script for benches/e2e.sh's reference client: every key in $KEYS
-- (one request path per line) is fetched once, the keys dealt out between
-- wrk's threads in turn ($THREADS, wrk's -t); a thread stops once it has
-- the answers to its share. A connection whose thread has sent its whole
-- share asks for the thread's first key again, so a few requests past the
-- keys may go out; they end unanswered. wrk itself runs for its -d
-- duration whatever its threads do, so each thread that is done adds a line
-- to $DONE, and the one that finds every thread's line there ends wrk.
local keys = {}
for line in io.lines(os.getenv("KEYS")) do
    keys[#keys + 1] = line
end
local threads = tonumber(os.getenv("THREADS"))
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
    answered = 0
end

function request()
    local key = keys[next_key] or keys[id + 1]
    next_key = next_key + threads
    return wrk.format("GET", key)
end

function response(status, headers, body)
    answered = answered + 1
    if answered == share then
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
        wrk.thread:stop()
    end
end
