// Typings for index.js, the public API. Written by hand (the engine's generated typings are
// native.d.ts, which is internal); keep them in step with index.js and src/binding.rs.

import { EventEmitter } from 'node:events'

/**
 * A value that can be stored under a key and gossiped, carried exactly: strings, numbers
 * (including `-0`, `NaN`, `±Infinity`), booleans, `null`, arrays (their elements), plain objects
 * (prototype `Object.prototype` or `null`; own enumerable string keys), and `Buffer`/`Uint8Array`
 * (which arrive as `Buffer`), nested up to 512 levels.
 *
 * `undefined` is sent as `null`; an object with a `toJSON()` method (such as `Date`) is sent as
 * its result, applied once as `JSON.stringify` does.
 *
 * Refused by `setLocalState` with a TypeError naming the path (e.g. `"value.items[3]"`), because
 * they would arrive changed: code `ERR_INVALID_ARG_TYPE` for functions, symbols, BigInts, `Map`,
 * `Set`, `WeakMap`, `WeakSet`, typed arrays other than `Uint8Array` and `DataView`,
 * `ArrayBuffer`/`SharedArrayBuffer`, boxed primitives (`new String('x')`) and any other object
 * whose prototype is not `Object.prototype` or `null` (class instances, `Error`, `RegExp`...)
 * unless it has `toJSON()`; code `ERR_INVALID_ARG_VALUE` for strings (values or object keys) with
 * a lone surrogate, which UTF-8 cannot carry. Cyclic structures are a TypeError too
 * (`ERR_INVALID_ARG_VALUE`, naming just the argument), nesting deeper than 512 levels a RangeError.
 */
export type Value =
  | string
  | number
  | boolean
  | null
  | Buffer
  | Uint8Array
  | Value[]
  | { [key: string]: Value }

/** The events a Gossiper emits, with their arguments. */
export interface GossiperEvents {
  /** A peer's key got a new value, as this node learns it (a fast series of writes may arrive as its last value only). */
  update: [peer: string, key: string, value: Value]
  /**
   * A peer deleted a key (or let it expire), as this node learns it: once per deletion, in order
   * with the peer's updates. Never for this node's own deletions, nor for a key this node never saw.
   */
  delete: [peer: string, key: string]
  /** A peer was heard of for the first time. */
  new_peer: [peer: string]
  /** A peer reported failed is heard from again (heartbeats resumed, or it restarted). */
  peer_alive: [peer: string]
  /** A peer was convicted by the failure detector, or announced that it stopped. */
  peer_failed: [peer: string]
}

export type GossiperEventName = keyof GossiperEvents

export interface GossiperOptions {
  /** TCP port to listen on, and UDP port of the same number for datagrams; 0 picks a free one (and keeps it across restarts). Default 0. */
  port?: number
  /** Peers to contact first, as `"host:port"` or `"[ipv6]:port"`; hosts are resolved on each contact. Default `[]`. */
  seeds?: readonly string[]
  /**
   * IP address to listen on. A specific IP is also advertised as this node's name. Without it,
   * or with `'0.0.0.0'` / `'::'`, the node listens on every interface and advertises (unless
   * `advertise` is given): the local address that routes to the seeds, every address they
   * resolve to considered, non-loopback seeds first (a loopback seed gives `127.0.0.1`: a
   * one-host cluster); with no seed that resolves, the host's first non-loopback address (IPv4
   * first, private ranges first); loopback only when the host has nothing else.
   */
  address?: string
  /**
   * The address other nodes reach this one at, when it differs from the one it listens on (NAT,
   * port mapping, containers): `"ip:port"`, `"[ipv6]:port"`, or an IP (then the port listened on).
   */
  advertise?: string
  /** Nodes drop every message from a cluster with another name. At most 255 bytes. Default `'gossiper'`. */
  clusterName?: string
  /** Milliseconds between gossip rounds (and heartbeats). Default 1000. */
  gossipInterval?: number
  /** Live peers each gossip round exchanges with (1-16): more spreads heartbeats faster (failure detection sooner and more even across observers), costs traffic and CPU. Default 1. */
  gossipFanout?: number
  /** Phi above which a silent peer is reported failed; 8 is about 18.4 heartbeat intervals (one per round) after its last heartbeat arrived. Default 8. */
  phiThreshold?: number
  /** Milliseconds: heartbeat gaps longer than this are counted as this long by the failure detector. Default 10000. */
  maxInterval?: number
  /** Milliseconds after which a failed (or departed) peer is forgotten. Default 86400000 (24 h). */
  deadPeerTtl?: number
  /**
   * Milliseconds a deletion is remembered (as a tombstone) before it is forgotten. A node that
   * was away for longer gets this node's whole state on its return instead of the changes;
   * either way deleted keys stay deleted. Default 3600000 (1 h).
   */
  tombstoneTtl?: number
  /** Branching of the tree that broadcasts fresh writes, departures and new incarnations at once (1-64). Default 4. */
  pushFanout?: number
  /** Milliseconds allowed for an outgoing connection (and for announcing a stop). Default 2000. */
  connectTimeout?: number
  /** Milliseconds a connection may wait for its next message, and a send may take, before it is closed. Default 5000. */
  idleTimeout?: number
  /**
   * Largest UDP datagram sent or accepted, in bytes (0-65507). A round's exchange with a live
   * peer goes by datagrams when its frames fit, by TCP otherwise (and at once when a datagram
   * goes unanswered). 0 turns datagrams off. Use one value cluster-wide. Default 1400.
   */
  maxDatagramBytes?: number
  /** Largest frame sent or accepted, in bytes. Default 4194304 (4 MiB). */
  maxFrameBytes?: number
  /** Largest key, in UTF-8 bytes; `setLocalState` refuses a longer one with a RangeError. Default 1024. */
  maxKeyBytes?: number
  /**
   * Largest value, in encoded (MessagePack) bytes. Default 262144 (256 KiB). With `maxKeyBytes`
   * it must fit in one frame (about `maxFrameBytes` less 64 KiB), else the constructor throws a
   * RangeError. `setLocalState`
   * stops encoding as soon as the value would pass it and throws a RangeError
   * (`ERR_OUT_OF_RANGE`).
   */
  maxValueBytes?: number
  /**
   * Most peer entries one message may carry, sent or accepted; a larger membership is digested
   * a window at a time (keep it above about half the cluster size). Default 8192.
   */
  maxPeersPerMessage?: number
  /**
   * Most inbound connections served at once. A connection that has not sent its first message
   * makes room for a new one; nodes other than live peers may hold three quarters. Default 1024.
   */
  maxInboundConnections?: number
  /**
   * Cluster keys: each a 32-byte Buffer (or Uint8Array) or its base64 text. With keys, every
   * frame is encrypted and authenticated (XChaCha20-Poly1305) under `keys[0]`, and frames that
   * do not open under one of them are dropped. At least one; leave it out for plaintext. Never
   * shown again: `options.keys` reads `'[redacted]'` for each.
   */
  keys?: readonly (Buffer | Uint8Array | string)[]
  /**
   * With `keys`: also accept plaintext frames (and answer them in plaintext), while sending
   * sealed ones, to turn encryption on in a running cluster. Counted in
   * `stats().plaintextAccepted`. The cluster is as open as without keys while it is on.
   * Default false.
   */
  acceptPlaintext?: boolean
  /**
   * Milliseconds the clocks of two members may differ: a generation (start time) further ahead
   * of ours is refused as implausible; with keys, a frame stamped further from our clock is
   * dropped (`stale`), and frames within it are remembered so that a replay is dropped.
   * Default 60000, at least 1000.
   */
  maxClockSkew?: number
  /**
   * Most peers kept, live and failed together; more names are refused and counted. A name heard
   * of second-hand becomes a peer only once heard from, or heard beating. Default 10000.
   */
  maxPeers?: number
  /**
   * Most keys held for one node, this one included, deletions counted until they are collected
   * (`tombstoneTtl`): a write past it throws a RangeError. Also the most keys one message
   * carries. Default 65536.
   */
  maxKeysPerPeer?: number
  /** Most bytes of keys and values held for one node, this one included. Default 16777216 (16 MiB). */
  maxBytesPerPeer?: number
}

/** Options with the defaults filled in, as `gossiper.options` returns them. */
export type ResolvedGossiperOptions = Readonly<Required<Omit<GossiperOptions, 'seeds' | 'address' | 'advertise' | 'keys'>>> & {
  readonly seeds: readonly string[]
  readonly address: string | undefined
  readonly advertise: string | undefined
  /** `'[redacted]'` for each key given; `listKeys()` has the keys themselves. */
  readonly keys: readonly '[redacted]'[] | undefined
}

/** What one node knows of one peer, for monitoring. */
export interface PeerDetail {
  /** The peer's name, `"ip:port"`. */
  name: string
  /** The peer's incarnation: a number (about its start time in ms) that grows with every start. */
  generation: number
  /** The peer's latest heartbeat counter known here. */
  heartbeat: number
  /** The version of the peer's newest key known here. */
  maxVersion: number
  /** Whether the peer is considered alive. */
  live: boolean
  /** Whether the peer announced that it stopped. */
  left: boolean
  /** Current suspicion level of the failure detector; it is failed above `phiThreshold`. */
  phi: number
  /** The peer's collection horizon known here: the highest version whose deletion the peer has forgotten. */
  horizon: number
}

/** Options of `setLocalState`. */
export interface SetLocalStateOptions {
  /** Milliseconds (1 to a year) after which this node deletes the key, unless it is written again meanwhile. */
  ttl?: number
}

/** Reasons input from the network is refused. */
export type RejectionReason =
  /** Not MessagePack of the expected shape, truncated, or with trailing bytes. */
  | 'malformed'
  /** Longer than `maxFrameBytes` (a datagram: `maxDatagramBytes`). */
  | 'oversized'
  /** Another protocol version. */
  | 'wrongVersion'
  /** Another `clusterName`. */
  | 'wrongCluster'
  /** An unknown message kind. */
  | 'unknownKind'
  /** A node name that is not a canonical `ip:port`. */
  | 'badName'
  /** A key or value outside the limits, or a value that is not one MessagePack value. */
  | 'badKeyValue'
  /** Too many entries, or a counter out of range. */
  | 'outOfBounds'
  /** Well formed, but not the message expected at that point of an exchange. */
  | 'unexpected'
  /**
   * Counters no honest node could have reached yet: counted per node entry refused, the rest of
   * the frame is used.
   */
  | 'implausible'
  /** A plaintext frame at a node with keys (without `acceptPlaintext`). */
  | 'plaintext'
  /** Sealed under a key that is not installed here (or this node has no keys). */
  | 'unknownKey'
  /** Sealed, but does not authenticate: altered, forged, or for another cluster. */
  | 'forged'
  /** Sealed further than `maxClockSkew` from our clock, or by an older incarnation of its sender. */
  | 'stale'
  /** Sealed and fresh, but seen before, addressed to another node, or not answering our last frame. */
  | 'replayed'
  /** A node name refused: the peer table (`maxPeers`) or the table of names heard of is full. */
  | 'tooManyPeers'
  /** Keys refused: past `maxKeysPerPeer` for their node, or in one message. */
  | 'tooManyKeys'
  /** Keys refused: past `maxBytesPerPeer` for their node. */
  | 'tooManyBytes'
  /** A connection dropped because partly received frames, across the process, exceeded their budget. */
  | 'frameBudget'
  /** A frame that did not arrive in full within `idleTimeout`. */
  | 'timedOut'
  /** A connection closed to make room: its source had the most connections yet to send a frame. */
  | 'sourceLimit'
  /** A connection refused, or closed to make room, for want of an inbound slot. */
  | 'inboundFull'
  /** A datagram from a node that is not a live peer, or a datagram reply answering nothing this node sent. */
  | 'unsolicited'

/** Engine counters since the Gossiper was created. */
export interface GossiperStats {
  messagesSent: number
  messagesReceived: number
  bytesSent: number
  bytesReceived: number
  /** Push-pull exchanges completed, started by either side. */
  exchanges: number
  /** Exchanges this node started that completed over UDP datagrams, without a connection (also in `exchanges`). */
  datagramExchanges: number
  /** Push messages sent: fresh changes sent to a few random live peers between gossip rounds. */
  pushesSent: number
  /** Outgoing connections that failed or timed out. */
  connectFailures: number
  /** Messages whose send failed or took longer than `idleTimeout`. */
  sendFailures: number
  /** Inbound connections refused, or closed to make room for a new one (see `maxInboundConnections`). */
  connectionsRefused: number
  /** Outgoing connection attempts (to failed or unreachable nodes, or seeds) skipped for want of budget. */
  connectsSkipped: number
  /** Seed host names that resolved to nothing when contacted; they are tried again in later rounds. */
  seedResolveFailures: number
  /** New incarnations begun to refute claims about this node that it did not make. */
  refutations: number
  /** Plaintext frames taken under `acceptPlaintext`: when it stops rising everywhere, every member seals. */
  plaintextAccepted: number
  /** Input refused (frames, connections, names, keys; for `implausible`, node entries), by reason. */
  rejected: Record<RejectionReason, number>
}

/** Node-style completion callback of `start` and `stop`. */
export type GossiperCallback = (err: Error | null) => void

/**
 * A member of a gossip cluster: shares its own key/value state with every peer, learns theirs,
 * and reports peers joining, failing and coming back. Listeners are called with `this` set to
 * the Gossiper.
 */
export declare class Gossiper extends EventEmitter {
  /** The original node-gossip signature. `ip_to_bind` is the `address` option. */
  constructor(port: number, seeds?: readonly string[], ip_to_bind?: string)
  constructor(options?: GossiperOptions)

  /**
   * This node's own name, `"ip:port"` (see the `address` option for how it is chosen); set when
   * `start()` returns, or, when seeds given as host names must be looked up first, by the time
   * its promise resolves. Undefined before the first start.
   */
  readonly peer_name: string | undefined
  /** The options in force, defaults filled in. */
  readonly options: ResolvedGossiperOptions

  /**
   * Listens, then gossips every `gossipInterval`. Resolves, and calls back, once listening and
   * named (`peer_name`). Rejects with an error whose `code` is e.g. `'EADDRINUSE'`. Throws (code
   * `'ERR_GOSSIP_RUNNING'`) when the calls so far leave it started. Calls to `start()` and
   * `stop()` take effect in call order: a `start()` made while a stop is under way runs once
   * that stop has finished, so `start(); stop(); start()` always ends started.
   */
  start(callback?: GossiperCallback): Promise<void>
  /**
   * Announces the departure to peers, stops listening and gossiping; local state is kept.
   * Resolves once every task has ended and the port is free; every call made meanwhile resolves
   * then too. No event is emitted after it resolves, until the next `start()`.
   */
  stop(callback?: GossiperCallback): Promise<void>
  /** Lets the process exit while this gossiper runs, as `server.unref()` does. */
  unref(): this
  /** Undoes `unref()`: a started gossiper keeps the process alive (the default). */
  ref(): this

  /**
   * Sets a key of this node's state; peers receive it as an 'update' event. With `ttl`, this node
   * deletes the key when it expires (by its own clock); writing the key again without `ttl`
   * cancels the expiry. Throws, storing nothing: a TypeError for a key that is not a non-empty
   * string, or that has a lone surrogate (`ERR_INVALID_ARG_VALUE`), for a value that cannot be
   * carried exactly (see `Value`; the message names the path to the offending part), or for
   * options other than `{ ttl }`; a RangeError (`ERR_OUT_OF_RANGE`) for a key over `maxKeyBytes`
   * UTF-8 bytes, a value whose encoding passes `maxValueBytes`, detected as soon as it does (a
   * huge array, string or Buffer by its length alone), or a `ttl` out of range.
   */
  setLocalState(key: string, value: Value, options?: SetLocalStateOptions): void
  /**
   * Deletes a key of this node's state; peers receive a 'delete' event. True when the key
   * existed. Keys are checked as by `getLocalState`.
   */
  deleteLocalState(key: string): boolean
  /** This node's value of a key. Keys are checked as by `setLocalState`, limits aside. */
  getLocalState(key: string): Value | undefined
  /**
   * The latest known value of a peer's key. `peer` must be a string without lone surrogates
   * (TypeError, `ERR_INVALID_ARG_VALUE`); `key` is checked as by `getLocalState`.
   */
  peerValue(peer: string, key: string): Value | undefined
  /** The keys known of a peer; empty for an unknown peer. `peer` is checked as by `peerValue`. */
  peerKeys(peer: string): string[]
  /** Names (`"ip:port"`) of every known peer, this node excluded. */
  allPeers(): string[]
  /** Names of the peers currently considered alive. */
  livePeers(): string[]
  /** Names of the peers currently considered failed (and not yet forgotten). */
  deadPeers(): string[]
  /** Per-peer detail: generation, heartbeat, maxVersion, live, left and current phi. */
  peerDetails(): PeerDetail[]
  /** Engine counters: messages, bytes, exchanges, pushes, and frames rejected by reason. */
  stats(): GossiperStats

  /**
   * Accepts frames sealed with `key` (32 bytes, or its base64 text) from now on; false when it was
   * installed already. Throws `ERR_GOSSIP_NO_KEYS` on a gossiper created without keys.
   */
  installKey(key: Buffer | Uint8Array | string): boolean
  /** Seals every frame with the installed `key` from now on (else throws `ERR_GOSSIP_UNKNOWN_KEY`). */
  useKey(key: Buffer | Uint8Array | string): void
  /**
   * Stops accepting `key` and wipes it; false when it was not installed. The primary key cannot be
   * removed (throws `ERR_GOSSIP_PRIMARY_KEY`): `useKey()` another first.
   */
  removeKey(key: Buffer | Uint8Array | string): boolean
  /** The installed keys as base64, the primary (the one that seals) first; `[]` without keys. */
  listKeys(): string[]

  on(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  on(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  on(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  on<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  once(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  once(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  once(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  once<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  off(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  off(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  off(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  off<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  addListener(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  addListener(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  addListener(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  addListener<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  prependListener(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  prependListener(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  prependListener(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  prependListener<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  removeListener(event: 'update', listener: (this: this, peer: string, key: string, value: Value) => void): this
  removeListener(event: 'delete', listener: (this: this, peer: string, key: string) => void): this
  removeListener(event: 'new_peer' | 'peer_alive' | 'peer_failed', listener: (this: this, peer: string) => void): this
  removeListener<E extends string | symbol>(event: E extends GossiperEventName ? never : E, listener: (...args: any[]) => void): this

  emit(event: 'update', peer: string, key: string, value: Value): boolean
  emit(event: 'delete', peer: string, key: string): boolean
  emit(event: 'new_peer' | 'peer_alive' | 'peer_failed', peer: string): boolean
  emit<E extends string | symbol>(event: E extends GossiperEventName ? never : E, ...args: any[]): boolean
}

/** The defaults of every option (see `GossiperOptions`). */
export declare const DEFAULTS: Readonly<Required<Omit<GossiperOptions, 'seeds' | 'address' | 'advertise' | 'keys'>>> & {
  readonly seeds: readonly string[]
  readonly address: undefined
  readonly advertise: undefined
  readonly keys: undefined
}

interface GossiperModule {
  Gossiper: typeof Gossiper
  DEFAULTS: typeof DEFAULTS
  default: GossiperModule
}

/** `module.exports` itself, for `import gossiper from 'gossiper'`. */
declare const gossiper: GossiperModule
export default gossiper
