'use strict'
// The public Gossiper: an EventEmitter around the native engine. Arguments are checked here so
// that mistakes surface as TypeError/RangeError naming the argument; the engine trusts them.

const { EventEmitter } = require('node:events')
const net = require('node:net')
const { encodeValue, decodeValue, Decoder, checkWellFormed } = require('./values')
const { NativeGossiper, optionSpecs, otherOptionNames, MAX_TTL_MS } = loadNative()

function loadNative() {
  try {
    return require('./gossiper.node')
  } catch (error) {
    error.message = `gossiper: the native addon is not built (run \`npm install\` or \`npm run build\`): ${error.message}`
    throw error
  }
}

// Numeric options, their defaults and bounds come from the engine's table (src/config.rs), the
// one source of truth; the engine checks every option again.
const SPECS = optionSpecs()
const NUMERIC_OPTIONS = SPECS.filter((spec) => spec.name !== 'port')
const KNOWN_OPTIONS = new Set([...SPECS.map((spec) => spec.name), ...otherOptionNames()])

const DEFAULTS = Object.freeze({
  ...Object.fromEntries(SPECS.map((spec) => [spec.name, spec.default])),
  seeds: Object.freeze([]),
  address: undefined,
  advertise: undefined,
  clusterName: 'gossiper',
  keys: undefined,
  acceptPlaintext: false,
})

const KEY_BYTES = 32
// What options.keys shows in place of each key: keys must never reach logs or util.inspect().
const REDACTED = '[redacted]'

// Event records from the engine (src/binding.rs, EventBatch): kinds 0 and 4 are groups of
// updates and deletions of one peer; the others name one peer.
const UPDATES = 0
const DELETES = 4
const EVENT_NAMES = [undefined, 'new_peer', 'peer_alive', 'peer_failed']

// Started gossipers stay reachable even if the caller drops them, as a listening server does.
const running = new Set()

function typeError(message, code = 'ERR_INVALID_ARG_TYPE') {
  return Object.assign(new TypeError(message), { code })
}

function rangeError(message) {
  return Object.assign(new RangeError(message), { code: 'ERR_OUT_OF_RANGE' })
}

function checkNumber(name, value, min, max, integer = false) {
  if (typeof value !== 'number' || Number.isNaN(value)) {
    throw typeError(`The "${name}" argument must be a number. Received ${describe(value)}`)
  }
  if (value < min || value > max || (integer && !Number.isInteger(value))) {
    const what = integer ? 'an integer' : 'a number'
    throw rangeError(`The "${name}" argument must be ${what} >= ${min} and <= ${max}. Received ${value}`)
  }
}

function describe(value) {
  if (value === null) return 'null'
  if (typeof value === 'string') return `'${value.length > 40 ? value.slice(0, 40) + '...' : value}'`
  if (typeof value === 'object' || typeof value === 'function') return `an instance of ${value.constructor?.name ?? 'Object'}`
  return `type ${typeof value} (${String(value)})`
}

// A seed is "host:port" or "[ipv6]:port"; the host is resolved each time it is contacted.
function checkSeed(seed, index) {
  const name = `seeds[${index}]`
  if (typeof seed !== 'string') throw typeError(`The "${name}" argument must be a string "host:port". Received ${describe(seed)}`)
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^\s:[\]]+)):(\d{1,5})$/.exec(seed)
  if (!match || (match[1] !== undefined && net.isIPv6(match[1]) === false)) {
    throw typeError(`The "${name}" argument must be "host:port" or "[ipv6]:port". Received ${describe(seed)}`, 'ERR_INVALID_ARG_VALUE')
  }
  const port = Number(match[3])
  if (port < 1 || port > 65535) throw rangeError(`The port of "${name}" must be >= 1 and <= 65535. Received ${port}`)
  return seed
}

// A cluster key as the engine takes it: a fresh Buffer of 32 bytes, which the caller wipes once
// the engine has copied it. Messages name the argument, never the key.
function keyBytes(value, name) {
  let bytes
  if (typeof value === 'string') {
    bytes = Buffer.from(value, 'base64')
    if (bytes.toString('base64') !== value) {
      bytes.fill(0)
      throw typeError(`The "${name}" argument must be a Buffer of ${KEY_BYTES} bytes or its base64 text (as buf.toString('base64') writes it). Received a string that is not base64`, 'ERR_INVALID_ARG_VALUE')
    }
  } else if (value instanceof Uint8Array) {
    bytes = Buffer.from(value)
  } else {
    const what = value === null ? 'null' : typeof value === 'object' ? `an instance of ${value.constructor?.name ?? 'Object'}` : `type ${typeof value}`
    throw typeError(`The "${name}" argument must be a Buffer of ${KEY_BYTES} bytes or its base64 text. Received ${what}`)
  }
  if (bytes.length !== KEY_BYTES) {
    const length = bytes.length
    bytes.fill(0)
    throw Object.assign(new RangeError(`The "${name}" argument must be ${KEY_BYTES} bytes. Received ${length} bytes`), { code: 'ERR_CRYPTO_INVALID_KEYLEN' })
  }
  return bytes
}

// Checks the keys option; returns their bytes (for the engine) and what options.keys shows.
function checkKeys(keys) {
  if (keys === undefined) return { secrets: [], shown: undefined }
  if (!Array.isArray(keys)) throw typeError('The "keys" argument must be an array of keys (32-byte Buffers or base64 strings)')
  if (keys.length === 0) throw typeError('The "keys" argument must hold at least one key; leave it out for a cluster without keys', 'ERR_INVALID_ARG_VALUE')
  const secrets = []
  try {
    for (let i = 0; i < keys.length; i++) secrets.push(keyBytes(keys[i], `keys[${i}]`))
  } catch (error) {
    wipe(secrets)
    throw error
  }
  return { secrets, shown: Object.freeze(keys.map(() => REDACTED)) }
}

function wipe(buffers) {
  for (const buffer of buffers) buffer.fill(0)
}

function normalizeOptions(portOrOptions, seeds, ipToBind) {
  const given = typeof portOrOptions === 'object' && portOrOptions !== null
    ? portOrOptions
    : { port: portOrOptions, seeds, address: ipToBind }
  const options = { ...DEFAULTS }
  for (const [key, value] of Object.entries(given)) {
    if (!KNOWN_OPTIONS.has(key)) {
      throw typeError(`The option "${key}" is not known. Known options: ${[...KNOWN_OPTIONS].join(', ')}`, 'ERR_INVALID_ARG_VALUE')
    }
    if (value !== undefined) options[key] = value
  }
  checkNumber('port', options.port, 0, 65535, true)
  if (!Array.isArray(options.seeds)) throw typeError(`The "seeds" argument must be an array of "host:port" strings. Received ${describe(options.seeds)}`)
  options.seeds = options.seeds.map(checkSeed)
  if (options.address !== undefined && (typeof options.address !== 'string' || net.isIP(options.address) === 0)) {
    throw typeError(`The "address" argument must be an IP address string. Received ${describe(options.address)}`, typeof options.address === 'string' ? 'ERR_INVALID_ARG_VALUE' : 'ERR_INVALID_ARG_TYPE')
  }
  if (options.advertise !== undefined && !isAdvertise(options.advertise)) {
    throw typeError(`The "advertise" argument must be "ip:port", "[ipv6]:port" or an IP address. Received ${describe(options.advertise)}`, typeof options.advertise === 'string' ? 'ERR_INVALID_ARG_VALUE' : 'ERR_INVALID_ARG_TYPE')
  }
  if (typeof options.clusterName !== 'string' || options.clusterName.length === 0 || Buffer.byteLength(options.clusterName) > 255) {
    throw typeError(`The "clusterName" argument must be a non-empty string of at most 255 bytes. Received ${describe(options.clusterName)}`)
  }
  for (const { name, min, max, integer } of NUMERIC_OPTIONS) checkNumber(name, options[name], min, max, integer)
  if (typeof options.acceptPlaintext !== 'boolean') {
    throw typeError(`The "acceptPlaintext" argument must be a boolean. Received ${describe(options.acceptPlaintext)}`)
  }
  const { secrets, shown } = checkKeys(options.keys)
  if (options.acceptPlaintext && secrets.length === 0) {
    throw typeError('The "acceptPlaintext" option needs "keys": without keys every frame is plaintext', 'ERR_INVALID_ARG_VALUE')
  }
  options.keys = shown
  return { options, secrets }
}

function isAdvertise(value) {
  if (typeof value !== 'string') return false
  if (net.isIP(value) !== 0) return true
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(value)
  if (!match) return false
  const ipOk = match[1] !== undefined ? net.isIPv6(match[1]) : net.isIPv4(match[2])
  const port = Number(match[3])
  return ipOk && port >= 1 && port <= 65535
}

// maxBytes (for keys being written) is checked on the length first, so that a huge string is
// refused without a pass over it: every UTF-16 unit takes at least one byte of UTF-8.
function checkKey(key, maxBytes = undefined) {
  if (typeof key !== 'string') throw typeError(`The "key" argument must be a string. Received ${describe(key)}`)
  if (key.length === 0) throw typeError('The "key" argument must not be empty', 'ERR_INVALID_ARG_VALUE')
  if (maxBytes !== undefined && key.length > maxBytes) throw keyTooLong(maxBytes)
  // A lone surrogate would reach the engine as U+FFFD, making 'x\uD800' and 'x\uDC00' one key.
  checkWellFormed(key, 'key')
  if (maxBytes !== undefined && Buffer.byteLength(key) > maxBytes) throw keyTooLong(maxBytes)
}

function keyTooLong(maxBytes) {
  return rangeError(`The "key" argument must be at most ${maxBytes} bytes (the maxKeyBytes option)`)
}

// The options of setLocalState: only `ttl`, in ms. Returns the ttl, or undefined.
function checkSetOptions(options) {
  if (options === undefined) return undefined
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw typeError(`The "options" argument must be an object. Received ${describe(options)}`)
  }
  for (const key of Object.keys(options)) {
    if (key !== 'ttl') throw typeError(`The option "${key}" is not known. Known options: ttl`, 'ERR_INVALID_ARG_VALUE')
  }
  if (options.ttl === undefined) return undefined
  checkNumber('options.ttl', options.ttl, 1, MAX_TTL_MS)
  return options.ttl
}

function checkPeer(peer) {
  if (typeof peer !== 'string') throw typeError(`The "peer" argument must be a string. Received ${describe(peer)}`)
  checkWellFormed(peer, 'peer')
}

function checkCallback(callback) {
  if (callback !== undefined && typeof callback !== 'function') {
    throw typeError(`The "callback" argument must be a function. Received ${describe(callback)}`)
  }
}

function settle(promise, callback) {
  if (callback === undefined) return promise
  promise.then(() => callback(null), callback)
  // The callback saw the error; the returned promise still rejects for whoever awaits it.
  promise.catch(() => {})
  return promise
}

class Gossiper extends EventEmitter {
  /**
   * new Gossiper(port, seeds = [], ip_to_bind) or new Gossiper({ port, seeds, address, ... })
   */
  constructor(portOrOptions, seeds = [], ipToBind = undefined) {
    super()
    const { options, secrets } = normalizeOptions(portOrOptions, seeds, ipToBind)
    this._options = Object.freeze(options)
    this.peer_name = undefined
    // Where the calls so far lead ('running' or 'stopped'), the last lifecycle step queued, and
    // how many steps are queued or running.
    this._target = 'stopped'
    this._lifecycle = Promise.resolve()
    this._busy = 0
    // True once a stop has finished: batches still in flight then are dropped.
    this._stopped = true
    this._keepAlive = null
    this._referenced = true
    // Events are queued decoders; one being drained is at the head.
    this._backlog = []
    // The native side must not keep this object alive, or it could never be collected.
    const self = new WeakRef(this)
    const given = Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined))
    if (secrets.length > 0) given.keys = secrets
    try {
      this._native = new NativeGossiper(given, (batch) => self.deref()?._receive(batch))
    } finally {
      wipe(secrets)
    }
  }

  /** The options in force, defaults filled in. */
  get options() {
    return this._options
  }

  /**
   * Listens, then gossips. Resolves (and calls back) once listening and named: peer_name is set
   * when start() returns, unless seeds given as host names must be looked up first (then when it
   * resolves). Calls made while a stop() is under way run once it has finished.
   */
  start(callback) {
    checkCallback(callback)
    if (this._target === 'running') {
      throw Object.assign(new Error(`Gossiper ${this.peer_name ?? ''} is already started`), { code: 'ERR_GOSSIP_RUNNING' })
    }
    this._target = 'running'
    return settle(this._enqueue(() => this._startNow()), callback)
  }

  /**
   * Tells a few peers it is leaving, stops listening and gossiping, and resolves once every
   * task has ended and the port is free. Local state is kept. Calls made while a stop is under
   * way share its completion; no event is emitted after it resolves, until the next start().
   */
  stop(callback) {
    checkCallback(callback)
    if (this._target === 'stopped') return settle(this._lifecycle.then(noop, noop), callback)
    this._target = 'stopped'
    return settle(this._enqueue(() => this._stopNow()), callback)
  }

  // Runs lifecycle steps one after another, in call order, so that any sequence of start() and
  // stop() calls ends the same way however long each step takes. A step with nothing before it
  // runs at once, so start() binds (and reports a busy port) synchronously.
  _enqueue(step) {
    const run = this._busy === 0 ? runNow(step) : this._lifecycle.then(noop, noop).then(step)
    this._busy++
    const settled = () => { this._busy-- }
    run.then(settled, settled)
    this._lifecycle = run
    return run
  }

  _startNow() {
    let named
    try {
      named = this._native.start()
    } catch (cause) {
      this._target = 'stopped'
      return Promise.reject(Object.assign(new Error(`${cause.code}: ${cause.message}`), {
        code: cause.code,
        port: this._options.port,
        address: this._options.address,
      }))
    }
    // Named at once unless a seed host name needs a lookup first.
    this.peer_name = this._native.name() ?? this.peer_name
    this._stopped = false
    running.add(this)
    this._keepAlive = setInterval(noop, 2 ** 31 - 1)
    if (!this._referenced) this._keepAlive.unref()
    return named.then((name) => { this.peer_name = name })
  }

  _stopNow() {
    clearInterval(this._keepAlive)
    this._keepAlive = null
    return this._native.stop().then(() => {
      this._stopped = true
      this._backlog.length = 0
      running.delete(this)
    })
  }

  /** Lets the process exit while this gossiper runs, as server.unref() does. */
  unref() {
    this._referenced = false
    this._keepAlive?.unref()
    return this
  }

  ref() {
    this._referenced = true
    this._keepAlive?.ref()
    return this
  }

  /**
   * Sets a key of this node. With `{ ttl }` (ms), this node deletes the key once the ttl has
   * passed, unless it is written again meanwhile (a write without ttl keeps it for good).
   */
  setLocalState(key, value, options = undefined) {
    const { maxKeyBytes, maxValueBytes } = this._options
    checkKey(key, maxKeyBytes)
    const ttl = checkSetOptions(options)
    // Stops, with a RangeError, as soon as the encoding would pass maxValueBytes.
    const encoded = encodeValue(value, 'value', maxValueBytes, 'maxValueBytes')
    this._native.setLocalState(key, encoded, ttl)
  }

  /** Deletes a key of this node; peers receive a 'delete' event. True when the key existed. */
  deleteLocalState(key) {
    checkKey(key)
    return this._native.deleteLocalState(key)
  }

  getLocalState(key) {
    checkKey(key)
    return decodeOptional(this._native.localValue(key))
  }

  peerValue(peer, key) {
    checkPeer(peer)
    checkKey(key)
    return decodeOptional(this._native.peerValue(peer, key))
  }

  peerKeys(peer) {
    checkPeer(peer)
    return this._native.peerKeys(peer)
  }

  allPeers() {
    return this._native.peers()
  }

  livePeers() {
    return this._native.peers(true)
  }

  deadPeers() {
    return this._native.peers(false)
  }

  /** Per-peer detail: generation, heartbeat, maxVersion, live, left and current phi. */
  peerDetails() {
    return this._native.peerDetails()
  }

  /**
   * Accepts frames sealed with `key` (a 32-byte Buffer or its base64 text) from now on. Returns
   * false when it was installed already. Throws ERR_GOSSIP_NO_KEYS on a gossiper created without
   * keys.
   */
  installKey(key) {
    return this._withKey(key, (bytes) => this._native.installKey(bytes))
  }

  /** Seals every frame with `key` from now on; it must be installed (ERR_GOSSIP_UNKNOWN_KEY). */
  useKey(key) {
    this._withKey(key, (bytes) => this._native.useKey(bytes))
  }

  /**
   * Stops accepting `key`. Returns false when it was not installed. The primary key cannot be
   * removed (ERR_GOSSIP_PRIMARY_KEY): useKey() another first.
   */
  removeKey(key) {
    return this._withKey(key, (bytes) => this._native.removeKey(bytes))
  }

  /** The installed keys as base64 text, the primary (the one that seals) first. */
  listKeys() {
    const buffers = this._native.listKeys()
    const keys = buffers.map((buffer) => buffer.toString('base64'))
    wipe(buffers)
    return keys
  }

  _withKey(key, use) {
    const bytes = keyBytes(key, 'key')
    try {
      return use(bytes)
    } finally {
      bytes.fill(0)
    }
  }

  /** Engine counters: messages, bytes, exchanges, pushes, and frames rejected by reason. */
  stats() {
    return this._native.stats()
  }

  _receive(batch) {
    if (batch.length === 0 || this._stopped) return
    this._backlog.push({ decoder: new Decoder(batch), kind: undefined, peer: undefined, remaining: 0 })
    if (this._backlog.length === 1) this._drain()
  }

  // Emits queued events in order. If a listener throws, the error propagates as from any
  // EventEmitter, and the events after it are still delivered, on the next turn.
  _drain() {
    let finished = false
    try {
      while (this._backlog.length > 0) {
        const cursor = this._backlog[0]
        const d = cursor.decoder
        for (;;) {
          while (cursor.remaining > 0) {
            cursor.remaining--
            const key = d.next()
            if (cursor.kind === UPDATES) this.emit('update', cursor.peer, key, d.next())
            else this.emit('delete', cursor.peer, key)
          }
          if (d.done()) break
          cursor.kind = d.next()
          cursor.peer = d.next()
          if (cursor.kind === UPDATES || cursor.kind === DELETES) cursor.remaining = d.next()
          else this.emit(EVENT_NAMES[cursor.kind], cursor.peer)
        }
        this._backlog.shift()
      }
      finished = true
    } finally {
      if (!finished) setImmediate(() => this._drain())
    }
  }
}

function noop() {}

function runNow(step) {
  try {
    return Promise.resolve(step())
  } catch (error) {
    return Promise.reject(error)
  }
}

function decodeOptional(encoded) {
  return encoded === null || encoded === undefined ? undefined : decodeValue(encoded)
}

module.exports = { Gossiper, DEFAULTS }
module.exports.default = module.exports
