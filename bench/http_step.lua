-- bench/http_step.lua -- wrk script for bench/http.sh.
--
-- Environment:
--   BENCH_MODE     "step": POST a binary float32 gradient to a session's step
--                  route, asking for the binary params back;
--                  "params": GET a session's params in binary (the daemon's
--                  HTTP floor: the same response, no gradient, no storage);
--                  "get": plain GET of wrk's URL (the nginx ceiling), so that
--                  both servers are measured by the same script and report;
--                  "json": POST the same gradient as a JSON document
--                  {"grad":[...]}, the params answered in JSON.
--   BENCH_PREFIX   step and params modes: sessions are BENCH_PREFIX<i>,
--                  i = 0..threads-1.
--                  Run wrk with as many threads as connections (-t N -c N):
--                  wrk only tells a script which thread it runs in, so one
--                  connection per thread is what gives every connection its
--                  own session.
--   BENCH_PARAMS   step and json modes: the sessions' size (float32 count).
--
-- Latency: wrk's own statistics are corrected for coordinated omission (it
-- adds synthetic samples for every response slower than the mean interval),
-- which models an open-loop client and moves even the p50 when a few
-- requests stall.  A training loop is a closed loop: it sends its next step
-- when the last one answers.  So each thread also times its own requests:
-- with one connection per thread, request() runs right before each request
-- is written, and the time between two calls is one request's round trip
-- (plus wrk's event-loop turn, the same for both servers).
--
-- done() prints one machine-readable line that bench/http.sh parses:
--   RESULT requests=N duration_us=N rps=X p50_us=X p99_us=X mean_us=X
--          samples=N wrk_p50_us=N wrk_p99_us=N status_errors=N socket_errors=N
-- (p50/p99/mean: the measured round trips; wrk_*: wrk's corrected figures).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

local function now_us()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
   return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

-- Four float32 values, little-endian: 0.01, -0.02, 0.005, -0.001.  Mixed
-- signs and sizes so that Adam's moments differ per parameter; all finite,
-- so the daemon applies every step (no 422, no skip).
local PATTERN = "\10\215\35\60" .. "\10\215\163\188" .. "\10\215\163\59" .. "\111\18\131\186"

local req
local last
-- Globals, so that done() can fetch them with thread:get.
lat = {}
nlat = 0

function init(args)
   local mode = os.getenv("BENCH_MODE") or "get"
   if mode == "get" then
      req = wrk.format("GET", nil, nil, nil)
      return
   end
   local prefix = os.getenv("BENCH_PREFIX")
   if not prefix then
      error(mode .. " mode needs BENCH_PREFIX")
   end
   if mode == "params" then
      req = wrk.format("GET", "/v1/sessions/" .. prefix .. id .. "/params",
                       {["Accept"] = "application/octet-stream"}, nil)
      return
   end
   local n = tonumber(os.getenv("BENCH_PARAMS") or "")
   if (mode ~= "step" and mode ~= "json") or not n then
      error("BENCH_MODE is step, json, params or get; step and json need BENCH_PARAMS")
   end
   if mode == "json" then
      local vals = {"0.01", "-0.02", "0.005", "-0.001"}
      local parts = {}
      for i = 1, n do
         parts[i] = vals[(i - 1) % 4 + 1]
      end
      req = wrk.format("POST", "/v1/sessions/" .. prefix .. id .. "/step",
                       {["Content-Type"] = "application/json"},
                       '{"grad":[' .. table.concat(parts, ",") .. ']}')
      return
   end
   local body = string.rep(PATTERN, math.floor(n / 4)) .. string.sub(PATTERN, 1, 4 * (n % 4))
   local path = "/v1/sessions/" .. prefix .. id .. "/step"
   local headers = {
      ["Content-Type"] = "application/octet-stream",
      ["Accept"] = "application/octet-stream",
   }
   -- One request string, built once: request() returns it unchanged, so
   -- wrk's per-request cost is the same as for the static GET.
   req = wrk.format("POST", path, headers, body)
end

function request()
   local t = now_us()
   if last then
      nlat = nlat + 1
      lat[nlat] = t - last
   end
   last = t
   return req
end

function done(summary, latency, requests)
   local all, n, sum = {}, 0, 0
   for _, thread in ipairs(threads) do
      local l = thread:get("lat")
      for i = 1, thread:get("nlat") do
         n = n + 1
         all[n] = l[i]
         sum = sum + l[i]
      end
   end
   table.sort(all)
   local function pct(p)
      if n == 0 then
         return 0
      end
      return all[math.max(1, math.ceil(n * p / 100))]
   end
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%.1f p99_us=%.1f mean_us=%.1f " ..
      "samples=%d wrk_p50_us=%d wrk_p99_us=%d status_errors=%d socket_errors=%d\n",
      summary.requests, summary.duration,
      summary.requests / (summary.duration / 1e6),
      pct(50), pct(99), n > 0 and sum / n or 0, n,
      latency:percentile(50), latency:percentile(99),
      e.status, e.connect + e.read + e.write + e.timeout))
end
