'use strict'

// MessagePack codec for the values that cross between JS and the Rust engine.
// Format reference: https://github.com/msgpack/msgpack/blob/master/spec.md

const MAX_DEPTH = 512
const TWO_32 = 0x100000000

// Encoder state lives in one object per encodeValue call, because a user's
// toJSON() may itself call encodeValue while we are in the middle of encoding.
class Writer {
  constructor(argName) {
    this.argName = argName
    this.buf = Buffer.allocUnsafe(256)
    this.pos = 0
    // Only the objects on the current path: a sub-object shared by two
    // branches is fine, meeting an ancestor again is a cycle.
    this.path = new Set()
  }

  reserve(n) {
    if (this.pos + n <= this.buf.length) return
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n))
    this.buf.copy(grown, 0, 0, this.pos)
    this.buf = grown
  }

  byte(b) {
    this.reserve(1)
    this.buf[this.pos++] = b
  }

  // Stores into a Uint8Array keep the low 8 bits, so no masking is needed.
  tag8(tag, v) {
    this.reserve(2)
    const buf = this.buf, p = this.pos
    buf[p] = tag
    buf[p + 1] = v
    this.pos = p + 2
  }

  tag16(tag, v) {
    this.reserve(3)
    const buf = this.buf, p = this.pos
    buf[p] = tag
    buf[p + 1] = v >>> 8
    buf[p + 2] = v
    this.pos = p + 3
  }

  tag32(tag, v) {
    this.reserve(5)
    this.buf[this.pos++] = tag
    this.put32(v)
  }

  tag64(tag, v) {
    // Math.floor (not truncation) makes the halves of a negative number come
    // out as its two's complement.
    const hi = Math.floor(v / TWO_32)
    this.reserve(9)
    this.buf[this.pos++] = tag
    this.put32(hi >>> 0)
    this.put32(v - hi * TWO_32)
  }

  // Caller reserves the space.
  put32(v) {
    const buf = this.buf, p = this.pos
    buf[p] = v >>> 24
    buf[p + 1] = v >>> 16
    buf[p + 2] = v >>> 8
    buf[p + 3] = v
    this.pos = p + 4
  }

  // Shared by str/bin/array/map headers. A fixLimit of 0 means the family has
  // no fix format, a t8 of 0 that it has no 8-bit length format.
  header(len, fixBase, fixLimit, t8, t16, t32) {
    if (len < fixLimit) this.byte(fixBase | len)
    else if (t8 && len < 0x100) this.tag8(t8, len)
    else if (len < 0x10000) this.tag16(t16, len)
    else this.tag32(t32, len)
  }

  fail(what) {
    throw new TypeError(`The "${this.argName}" argument must not contain ${what}`)
  }

  // jsonDone mirrors JSON.stringify: toJSON() is applied once, not to its own result.
  write(v, jsonDone = false) {
    switch (typeof v) {
      case 'string': return this.string(v)
      case 'number': return this.number(v)
      case 'boolean': return this.byte(v ? 0xc3 : 0xc2)
      case 'undefined': return this.byte(0xc0)
      case 'function': return this.fail('a function')
      case 'symbol': return this.fail('a symbol')
      case 'bigint': return this.fail('a BigInt')
    }
    if (v === null) return this.byte(0xc0)
    // Checked before toJSON because Buffer has a toJSON we do not want.
    if (v instanceof Uint8Array) return this.binary(v)
    if (!jsonDone && typeof v.toJSON === 'function') return this.write(v.toJSON(), true)
    this.enter(v)
    if (Array.isArray(v)) this.array(v)
    else this.map(v)
    this.path.delete(v)
  }

  enter(o) {
    if (this.path.has(o)) {
      throw new TypeError(`The "${this.argName}" argument must not be cyclic`)
    }
    if (this.path.size >= MAX_DEPTH) {
      throw new RangeError(`The "${this.argName}" argument is nested deeper than ${MAX_DEPTH} levels`)
    }
    this.path.add(o)
  }

  number(v) {
    // -0 passes isSafeInteger but an int format would turn it into 0.
    if (!Number.isSafeInteger(v) || Object.is(v, -0)) {
      this.reserve(9)
      this.buf[this.pos] = 0xcb
      this.buf.writeDoubleBE(v, this.pos + 1)
      this.pos += 9
    } else if (v >= 0) {
      if (v < 0x80) this.byte(v)
      else if (v < 0x100) this.tag8(0xcc, v)
      else if (v < 0x10000) this.tag16(0xcd, v)
      else if (v < TWO_32) this.tag32(0xce, v)
      else this.tag64(0xcf, v)
    } else {
      if (v >= -0x20) this.byte(v)
      else if (v >= -0x80) this.tag8(0xd0, v)
      else if (v >= -0x8000) this.tag16(0xd1, v)
      else if (v >= -0x80000000) this.tag32(0xd2, v)
      else this.tag64(0xd3, v)
    }
  }

  string(s) {
    const n = s.length
    if (n < 32) {
      // Keys and small values are mostly short ASCII: copying char codes
      // directly beats a native UTF-8 call. Bail out on the first non-ASCII char.
      this.reserve(n + 1)
      const buf = this.buf, start = this.pos + 1
      let i = 0
      for (; i < n; i++) {
        const c = s.charCodeAt(i)
        if (c >= 0x80) break
        buf[start + i] = c
      }
      if (i === n) {
        buf[this.pos] = 0xa0 | n
        this.pos = start + n
        return
      }
    }
    const len = Buffer.byteLength(s)
    this.header(len, 0xa0, 32, 0xd9, 0xda, 0xdb)
    this.reserve(len)
    this.pos += this.buf.write(s, this.pos, len)
  }

  binary(b) {
    const n = b.length
    this.header(n, 0, 0, 0xc4, 0xc5, 0xc6)
    this.reserve(n)
    this.buf.set(b, this.pos)
    this.pos += n
  }

  array(a) {
    const n = a.length
    this.header(n, 0x90, 16, 0, 0xdc, 0xdd)
    for (let i = 0; i < n; i++) this.write(a[i])
  }

  // Any non-array object is encoded like JSON would: its own enumerable string
  // keys. Properties holding undefined are kept and encoded as nil, so the
  // decoded object has the key with value null.
  map(o) {
    const keys = Object.keys(o)
    const n = keys.length
    this.header(n, 0x80, 16, 0, 0xde, 0xdf)
    for (let i = 0; i < n; i++) {
      this.string(keys[i])
      this.write(o[keys[i]])
    }
  }
}

// argName only labels error messages. The result may be a view into a larger
// private allocation; nothing else holds a reference to it.
function encodeValue(value, argName = 'value') {
  const w = new Writer(argName)
  w.write(value)
  return w.buf.subarray(0, w.pos)
}

function truncated() {
  return new RangeError('truncated msgpack value')
}

// Reads consecutive msgpack items from a buffer. Every read is bounds-checked:
// a short buffer throws rather than yielding undefined/NaN garbage.
//
// 64-bit ints outside the safe range come back as the nearest Number (lossy);
// the encoder never produces them, only a foreign writer could.
class Decoder {
  constructor(buf, offset = 0) {
    // Work on a Buffer view so the native string slicers are available.
    this.buf = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)
    this.pos = offset
  }

  done() {
    return this.pos >= this.buf.length
  }

  need(n) {
    if (this.pos + n > this.buf.length) throw truncated()
  }

  u8() {
    this.need(1)
    return this.buf[this.pos++]
  }

  u16() {
    this.need(2)
    const buf = this.buf, p = this.pos
    this.pos = p + 2
    return (buf[p] << 8) | buf[p + 1]
  }

  u32() {
    this.need(4)
    const buf = this.buf, p = this.pos
    this.pos = p + 4
    // Multiply the top byte so the result stays unsigned.
    return buf[p] * 0x1000000 + ((buf[p + 1] << 16) | (buf[p + 2] << 8) | buf[p + 3])
  }

  next() {
    const buf = this.buf
    if (this.pos >= buf.length) throw truncated()
    const b = buf[this.pos++]
    // Hot formats first: fixint, fixstr, then the other fix families.
    if (b < 0x80) return b
    if (b >= 0xe0) return b - 0x100
    if (b >= 0xa0) {
      if (b < 0xc0) return this.str(b & 0x1f)
    } else if (b < 0x90) {
      return this.map(b & 0x0f)
    } else {
      return this.array(b & 0x0f)
    }
    switch (b) {
      case 0xc0: return null
      case 0xc1: throw new Error('invalid msgpack: reserved byte 0xc1')
      case 0xc2: return false
      case 0xc3: return true
      case 0xc4: return this.bytes(this.u8())
      case 0xc5: return this.bytes(this.u16())
      case 0xc6: return this.bytes(this.u32())
      case 0xc7: return this.ext(this.u8())
      case 0xc8: return this.ext(this.u16())
      case 0xc9: return this.ext(this.u32())
      case 0xca: {
        this.need(4)
        this.pos += 4
        return buf.readFloatBE(this.pos - 4)
      }
      case 0xcb: {
        this.need(8)
        this.pos += 8
        return buf.readDoubleBE(this.pos - 8)
      }
      case 0xcc: return this.u8()
      case 0xcd: return this.u16()
      case 0xce: return this.u32()
      case 0xcf: return this.u32() * TWO_32 + this.u32()
      case 0xd0: return (this.u8() << 24) >> 24
      case 0xd1: return (this.u16() << 16) >> 16
      case 0xd2: return this.u32() | 0
      case 0xd3: return (this.u32() | 0) * TWO_32 + this.u32()
      case 0xd4: return this.ext(1)
      case 0xd5: return this.ext(2)
      case 0xd6: return this.ext(4)
      case 0xd7: return this.ext(8)
      case 0xd8: return this.ext(16)
      case 0xd9: return this.str(this.u8())
      case 0xda: return this.str(this.u16())
      case 0xdb: return this.str(this.u32())
      case 0xdc: return this.array(this.u16())
      case 0xdd: return this.array(this.u32())
      case 0xde: return this.map(this.u16())
      case 0xdf: return this.map(this.u32())
    }
  }

  str(len) {
    this.need(len)
    const buf = this.buf, start = this.pos, end = start + len
    this.pos = end
    if (len < 32) {
      // A native call costs more than building a short ASCII string by hand.
      let s = ''
      for (let i = start; i < end; i++) {
        const c = buf[i]
        if (c >= 0x80) return buf.utf8Slice(start, end)
        s += String.fromCharCode(c)
      }
      return s
    }
    return buf.utf8Slice(start, end)
  }

  // A copy, so callers may keep it without pinning (or seeing changes to) the input.
  bytes(len) {
    this.need(len)
    const out = Buffer.allocUnsafe(len)
    this.buf.copy(out, 0, this.pos, this.pos + len)
    this.pos += len
    return out
  }

  ext(len) {
    const type = (this.u8() << 24) >> 24
    return { type, data: this.bytes(len) }
  }

  array(n) {
    // Every item takes at least one byte; checking up front stops a corrupt
    // length from allocating a huge array.
    if (n > this.buf.length - this.pos) throw truncated()
    const a = new Array(n)
    for (let i = 0; i < n; i++) a[i] = this.next()
    return a
  }

  map(n) {
    if (2 * n > this.buf.length - this.pos) throw truncated()
    const o = {}
    for (let i = 0; i < n; i++) {
      const k = this.key()
      const v = this.next()
      // Plain assignment of "__proto__" would replace the prototype instead
      // of creating a property.
      if (k === '__proto__') {
        Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true })
      } else {
        o[k] = v
      }
    }
    return o
  }

  key() {
    const b = this.buf[this.pos]
    if (b >= 0xa0 && b < 0xc0) {
      this.pos++
      return this.str(b & 0x1f)
    }
    const k = this.next()
    return typeof k === 'string' ? k : String(k)
  }
}

function decodeValue(buf, offset = 0) {
  return new Decoder(buf, offset).next()
}

module.exports = { encodeValue, decodeValue, Decoder }
