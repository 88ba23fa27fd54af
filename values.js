'use strict'

// MessagePack codec for the values that cross between JS and the Rust engine.
// Format reference: https://github.com/msgpack/msgpack/blob/master/spec.md

const { types } = require('node:util')
const { constants: bufferConstants } = require('node:buffer')

const MAX_DEPTH = 512
const TWO_32 = 0x100000000
// msgpack lengths are 32-bit; a Buffer cannot be larger than MAX_LENGTH either.
const MAX_BYTES = Math.min(bufferConstants.MAX_LENGTH, TWO_32 - 1)

// What an object may be, said in every refusal of one.
const CARRIED = 'values carry only plain objects, arrays, Buffers/Uint8Arrays and objects with a toJSON() method'

// A string with a lone surrogate cannot be written as UTF-8: it would come back with U+FFFD in
// its place. Node >= 20 has String.prototype.isWellFormed (and answers at once for one-byte
// strings); the fallback looks for the first lone surrogate.
const isWellFormed = typeof String.prototype.isWellFormed === 'function'
  ? (s) => s.isWellFormed()
  : (s) => loneSurrogateAt(s) === -1

function loneSurrogateAt(s) {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if (c < 0xd800 || c > 0xdfff) continue
    if (c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1)
      if (d >= 0xdc00 && d <= 0xdfff) {
        i++
        continue
      }
    }
    return i
  }
  return -1
}

// Where a refused string's first lone surrogate is, for the message.
function loneSurrogateText(s) {
  const at = loneSurrogateAt(s)
  return `a lone surrogate (U+${s.charCodeAt(at).toString(16).toUpperCase()} at index ${at}), which UTF-8 cannot carry`
}

/** Throws a TypeError (ERR_INVALID_ARG_VALUE) naming argName if s is not well-formed UTF-16. */
function checkWellFormed(s, argName) {
  if (isWellFormed(s)) return
  throw withCode(new TypeError(`The "${argName}" argument must not contain ${loneSurrogateText(s)}`), 'ERR_INVALID_ARG_VALUE')
}

function withCode(error, code) {
  error.code = code
  return error
}

// A part of the value that cannot be carried exactly. It climbs the encoder's frames, each adding
// the index or key it was at, and encodeValue turns it into an error naming that path.
class Refusal {
  constructor(ErrorType, code, text) {
    this.ErrorType = ErrorType
    this.code = code
    this.text = text
    // Innermost first.
    this.segments = []
    // Set when an object's key was refused: the path ends at that object.
    this.atKey = false
  }

  toError(argName) {
    let path = argName
    for (let i = this.segments.length - 1; i >= 0; i--) path += segment(this.segments[i])
    return withCode(new this.ErrorType(`The "${path}" argument ${this.text}`), this.code)
  }
}

function within(error, at) {
  if (error instanceof Refusal) {
    if (error.atKey) error.atKey = false
    else error.segments.push(at)
  }
  return error
}

const IDENTIFIER = /^[A-Za-z_$][\w$]*$/

function segment(at) {
  if (typeof at === 'number') return `[${at}]`
  if (at.length <= 40 && IDENTIFIER.test(at)) return `.${at}`
  return `[${JSON.stringify(shorten(at))}]`
}

function shorten(s) {
  return s.length > 40 ? s.slice(0, 40) + '...' : s
}

function refuseString(s, isKey) {
  const text = isKey
    ? `must not have a key (${JSON.stringify(shorten(s))}) that contains ${loneSurrogateText(s)}`
    : `must not contain ${loneSurrogateText(s)}`
  const refusal = new Refusal(TypeError, 'ERR_INVALID_ARG_VALUE', text)
  refusal.atKey = isKey === true
  return refusal
}

function refuseType(what) {
  return new Refusal(TypeError, 'ERR_INVALID_ARG_TYPE', `must not be ${what}`)
}

function article(name) {
  return /^[AEIO]/i.test(name) ? `an ${name}` : `a ${name}`
}

function constructorName(o) {
  try {
    const name = Object.getPrototypeOf(o)?.constructor?.name
    if (typeof name === 'string' && name !== '') return name
  } catch {}
  return undefined
}

// Says what a non-plain object is, for the error refusing it.
function refuseObject(o) {
  const name = constructorName(o)
  let what
  let hint = CARRIED
  if (types.isBoxedPrimitive(o)) {
    what = `a boxed ${name ?? 'primitive'}`
    hint = 'pass the primitive itself'
  } else if (types.isMap(o)) what = 'a Map'
  else if (types.isSet(o)) what = 'a Set'
  else if (types.isWeakMap(o)) what = 'a WeakMap'
  else if (types.isWeakSet(o)) what = 'a WeakSet'
  else if (types.isArrayBufferView(o)) {
    what = article(types.isDataView(o) ? 'DataView' : Object.prototype.toString.call(o).slice(8, -1))
    hint = 'of the typed arrays only Uint8Array and Buffer are carried'
  } else if (types.isAnyArrayBuffer(o)) {
    what = article(types.isSharedArrayBuffer(o) ? 'SharedArrayBuffer' : 'ArrayBuffer')
    hint = 'wrap it in a Uint8Array to send its bytes'
  } else if (name !== undefined) what = `an instance of ${name}`
  else what = 'an object whose prototype is neither Object.prototype nor null'
  return refuseType(`${what} (${hint})`)
}

// Whether proto is Object.prototype, possibly another realm's (a vm context's).
function isObjectPrototype(proto) {
  if (Object.getPrototypeOf(proto) !== null || !Object.hasOwn(proto, 'constructor')) return false
  const ctor = proto.constructor
  return typeof ctor === 'function' && ctor.prototype === proto && ctor.name === 'Object'
}

// Encoder state lives in one object per encodeValue call, because a user's
// toJSON() may itself call encodeValue while we are in the middle of encoding.
class Writer {
  constructor(argName, maxBytes, limitName) {
    this.argName = argName
    this.maxBytes = maxBytes
    this.limitName = limitName
    this.buf = Buffer.allocUnsafe(Math.min(256, maxBytes))
    this.pos = 0
    // Only the objects on the current path: a sub-object shared by two
    // branches is fine, meeting an ancestor again is a cycle.
    this.path = new Set()
  }

  // The buffer never grows past maxBytes, so the fast path needs no budget check.
  reserve(n) {
    if (this.pos + n <= this.buf.length) return
    this.grow(n)
  }

  grow(n) {
    const needed = this.pos + n
    if (needed > this.maxBytes) throw this.overBudget()
    const grown = Buffer.allocUnsafe(Math.min(Math.max(this.buf.length * 2, needed), this.maxBytes))
    this.buf.copy(grown, 0, 0, this.pos)
    this.buf = grown
  }

  // Thrown as soon as the output would pass maxBytes, or an input's size alone shows it will.
  overBudget() {
    const option = this.limitName === undefined ? '' : ` (the ${this.limitName} option)`
    const text = `The "${this.argName}" argument must encode to at most ${this.maxBytes} bytes of MessagePack${option}`
    return withCode(new RangeError(text), 'ERR_OUT_OF_RANGE')
  }

  // Bytes left under the budget.
  room() {
    return this.maxBytes - this.pos
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

  // jsonDone mirrors JSON.stringify: toJSON() is applied once, not to its own result.
  write(v, jsonDone = false) {
    switch (typeof v) {
      case 'string': return this.string(v)
      case 'number': return this.number(v)
      case 'boolean': return this.byte(v ? 0xc3 : 0xc2)
      case 'undefined': return this.byte(0xc0)
      case 'function': throw refuseType('a function')
      case 'symbol': throw refuseType('a symbol')
      case 'bigint': throw refuseType('a BigInt')
    }
    if (v === null) return this.byte(0xc0)
    // Checked before toJSON because Buffer has a toJSON we do not want.
    if (v instanceof Uint8Array) return this.binary(v)
    if (!jsonDone && typeof v.toJSON === 'function') {
      // A Buffer from another realm (a vm context) fails instanceof above.
      if (types.isUint8Array(v)) return this.binary(v)
      return this.write(v.toJSON(), true)
    }
    if (Array.isArray(v)) {
      this.enter(v)
      this.array(v)
    } else {
      // Only plain objects: anything else (Map, Set, typed arrays, boxed primitives, class
      // instances...) would arrive as a plain object and lose what it was.
      const proto = Object.getPrototypeOf(v)
      if (proto !== Object.prototype && proto !== null && !isObjectPrototype(proto)) {
        if (types.isUint8Array(v)) return this.binary(v)
        throw refuseObject(v)
      }
      this.enter(v)
      this.map(v)
    }
    this.path.delete(v)
  }

  enter(o) {
    if (this.path.has(o)) {
      throw withCode(new TypeError(`The "${this.argName}" argument must not be cyclic`), 'ERR_INVALID_ARG_VALUE')
    }
    if (this.path.size >= MAX_DEPTH) {
      throw withCode(new RangeError(`The "${this.argName}" argument is nested deeper than ${MAX_DEPTH} levels`), 'ERR_OUT_OF_RANGE')
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

  // isKey: s is an object's key, which the path names differently when refused.
  string(s, isKey) {
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
    this.text(s, isKey)
  }

  text(s, isKey) {
    // Every UTF-16 unit takes at least one byte of UTF-8.
    if (s.length > this.room()) throw this.overBudget()
    if (!isWellFormed(s)) throw refuseString(s, isKey)
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
    // Every item takes at least one byte.
    if (n > this.room()) throw this.overBudget()
    this.header(n, 0x90, 16, 0, 0xdc, 0xdd)
    let i = 0
    try {
      for (; i < n; i++) this.write(a[i])
    } catch (error) {
      throw within(error, i)
    }
  }

  // Any plain object is encoded like JSON would: its own enumerable string
  // keys. Properties holding undefined are kept and encoded as nil, so the
  // decoded object has the key with value null.
  map(o) {
    const keys = Object.keys(o)
    const n = keys.length
    // Every entry takes at least two bytes.
    if (n > this.room() / 2) throw this.overBudget()
    this.header(n, 0x80, 16, 0, 0xde, 0xdf)
    let i = 0
    try {
      for (; i < n; i++) {
        const key = keys[i]
        this.string(key, true)
        this.write(o[key])
      }
    } catch (error) {
      throw within(error, keys[i])
    }
  }
}

// argName only labels error messages. The encoding stops with a RangeError (code
// ERR_OUT_OF_RANGE) as soon as it would pass maxBytes; limitName, if given, is the option the
// message names as that limit. The result may be a view into a larger private allocation;
// nothing else holds a reference to it.
function encodeValue(value, argName = 'value', maxBytes = MAX_BYTES, limitName = undefined) {
  const w = new Writer(argName, maxBytes, limitName)
  try {
    w.write(value)
  } catch (error) {
    throw error instanceof Refusal ? error.toError(argName) : error
  }
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

module.exports = { encodeValue, decodeValue, Decoder, checkWellFormed }
