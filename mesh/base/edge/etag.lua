-- Strong ETags and conditional GETs for the edge's cacheable JSON routes.
--
-- The Lua filter of tools/envoy_config.py runs this file. Each cacheable route adds two
-- response headers: its Cache-Control, and the marker `x-fittracker-etag`, which this script
-- always removes. A marked 200 response gets `ETag: "<SHA-256 of the body, hex>"`, and a request
-- whose If-None-Match names that tag (weak comparison, RFC 9110 section 13.1.2) gets 304 with no
-- body; a marked error gets `Cache-Control: no-store`, so no cache keeps an error for minutes. Unmarked
-- responses pass untouched. (A response header, not route metadata: the Lua filter runs before
-- the transcoder re-routes the call, and its view of the route stays the pre-transcoding one.)
--
-- Why at the edge: the services speak gRPC and set no validators, and the transcoded JSON body is
-- what the CDN and the apps cache, so its hash is the one tag that is right for every replica.
-- The upstream call still happens on a revalidation: the saving is the bytes to the client and the
-- CDN's ability to keep serving its copy.
--
-- Envoy's Lua has no digest function, so SHA-256 is written out below with LuaJIT's 32-bit `bit`
-- operations (FIPS 180-4, section 6.2); tests/edge checks the tags against Python's hashlib.

local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, ror = bit.lshift, bit.rshift, bit.ror
local tobit, tohex = bit.tobit, bit.tohex
local byte, char, rep, concat = string.byte, string.char, string.rep, table.concat

local ROUND = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

local function be32(n)
  return char(band(rshift(n, 24), 255), band(rshift(n, 16), 255), band(rshift(n, 8), 255), band(n, 255))
end

local function sha256_hex(message)
  local length = #message
  -- Pad to a multiple of 64 bytes: 0x80, zeros, then the length in bits as 64-bit big-endian.
  local bits = length * 8
  message = message .. "\128" .. rep("\0", (55 - length) % 64)
      .. be32(math.floor(bits / 4294967296)) .. be32(bits % 4294967296)
  local h0, h1, h2, h3 = 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a
  local h4, h5, h6, h7 = 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  local w = {}
  for block = 1, #message, 64 do
    for i = 0, 15 do
      local b0, b1, b2, b3 = byte(message, block + 4 * i, block + 4 * i + 3)
      w[i] = bor(lshift(b0, 24), lshift(b1, 16), lshift(b2, 8), b3)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for i = 0, 63 do
      -- Sums of a few 32-bit values are exact in a double; tobit wraps them modulo 2^32.
      local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g))
          + ROUND[i + 1] + w[i]
      local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return concat({tohex(h0), tohex(h1), tohex(h2), tohex(h3), tohex(h4), tohex(h5), tohex(h6), tohex(h7)})
end

-- If-None-Match holds "*" or a list of entity tags, each maybe prefixed W/ (weak comparison).
local function none_match(condition, etag)
  if condition:match("^%s*%*%s*$") then
    return true
  end
  for tag in condition:gmatch('"[^"]*"') do
    if tag == etag then
      return true
    end
  end
  return false
end

-- Every request: keep If-None-Match for the response side, which cannot read request headers.
function envoy_on_request(handle)
  local condition = handle:headers():get("if-none-match")
  if condition ~= nil then
    handle:streamInfo():dynamicMetadata():set("fittracker.etag", "if_none_match", condition)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get("x-fittracker-etag") == nil then
    return
  end
  headers:remove("x-fittracker-etag")
  if headers:get(":status") ~= "200" then
    headers:replace("cache-control", "no-store")
    headers:remove("vary")
    return
  end
  local body = handle:body(true)
  local size = body:length()
  local etag = '"' .. sha256_hex(size > 0 and body:getBytes(0, size) or "") .. '"'
  -- Waiting for the body ended the old header object's scope: take the headers again.
  headers = handle:headers()
  headers:replace("etag", etag)
  local kept = handle:streamInfo():dynamicMetadata():get("fittracker.etag")
  if kept ~= nil and kept["if_none_match"] ~= nil and none_match(kept["if_none_match"], etag) then
    headers:replace(":status", "304")
    body:setBytes("")
    -- A 304 may carry Content-Length only as the 200's length (RFC 9110 section 8.6).
    headers:replace("content-length", tostring(size))
  end
end
