// Type-level test of index.d.ts: compiled with `tsc --noEmit -p __test__/types`, never run.
// Every `@ts-expect-error` line must be a type error, or tsc fails.

import { Gossiper, DEFAULTS } from 'gossiper'
import type { GossiperOptions, GossiperStats, PeerDetail, Value, ResolvedGossiperOptions } from 'gossiper'
import gossiperDefault from 'gossiper'
import cjs = require('gossiper')

// Both constructors, as the original (port, seeds, ip_to_bind) and with options.
const seed = new Gossiper(9000)
const peer = new Gossiper(9001, ['127.0.0.1:9000'], '127.0.0.1')
const bare = new Gossiper()
const options: GossiperOptions = {
  port: 0,
  seeds: ['127.0.0.1:9000', '[::1]:9000'],
  address: '127.0.0.1',
  clusterName: 'test',
  gossipInterval: 200,
  phiThreshold: 8,
  maxInterval: 10_000,
  deadPeerTtl: 60_000,
  tombstoneTtl: 600_000,
  pushFanout: 3,
  connectTimeout: 2000,
  idleTimeout: 5000,
  maxFrameBytes: 1 << 20,
  maxKeyBytes: 256,
  maxValueBytes: 64 * 1024,
  maxPeersPerMessage: 1000,
  maxInboundConnections: 64,
  keys: [Buffer.alloc(32), 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', new Uint8Array(32)],
  acceptPlaintext: false,
  maxClockSkew: 60_000,
  maxPeers: 5000,
  maxKeysPerPeer: 1000,
  maxBytesPerPeer: 1 << 20,
  maxDatagramBytes: 1400,
}
const configured = new Gossiper(options)
const frozenSeeds = ['127.0.0.1:9000'] as const
const fromConst = new Gossiper({ seeds: frozenSeeds })
const viaDefault = new gossiperDefault.Gossiper(0)
const viaRequire = new cjs.Gossiper({ port: 0 })
const viaDefaultOfRequire: typeof Gossiper = cjs.default.default.Gossiper

// DEFAULTS and options are fully resolved and read-only.
const interval: number = DEFAULTS.gossipInterval
const noAddress: undefined = DEFAULTS.address
const defaultSeeds: readonly string[] = DEFAULTS.seeds
// @ts-expect-error DEFAULTS is read-only
DEFAULTS.gossipInterval = 5
const resolved: ResolvedGossiperOptions = configured.options
const cluster: string = resolved.clusterName
const bound: string | undefined = resolved.address
// @ts-expect-error options is read-only
configured.options = resolved
// @ts-expect-error peer_name is read-only
seed.peer_name = 'x'

// Events, with typed parameters and `this` bound to the gossiper.
seed.on('update', function (peer, key, value) {
  const p: string = peer
  const k: string = key
  const v: Value = value
  const self: Gossiper = this
  console.log(`${self.peer_name} saw ${p} set ${k} to ${String(v)}`)
})
seed.on('delete', function (peer, key) {
  const p: string = peer
  const k: string = key
  const self: Gossiper = this
  console.log(`${self.peer_name} saw ${p} delete ${k}`)
})
seed.emit('delete', '127.0.0.1:9001', 'k')
seed.on('new_peer', (name) => console.log(name.toUpperCase()))
seed.once('peer_alive', function (name: string) {
  console.log(this.livePeers().includes(name))
})
const onFailed = (name: string): void => console.log('failed', name)
seed.addListener('peer_failed', onFailed)
seed.prependListener('peer_failed', onFailed)
seed.removeListener('peer_failed', onFailed)
seed.off('peer_failed', onFailed)
seed.on('error', (err: Error) => console.error(err.message))
const chained: Gossiper = seed.on('new_peer', () => {}).once('update', () => {}).off('new_peer', onFailed)
const emitted: boolean = seed.emit('update', '127.0.0.1:9001', 'k', { nested: [1, 'two', null] })
seed.emit('peer_failed', '127.0.0.1:9001')
seed.emit('custom', 1, 2, 3)

// @ts-expect-error a peer name is a string, not a number
seed.on('update', (peer: number) => console.log(peer))
// @ts-expect-error new_peer passes one string
seed.on('new_peer', (peer: string, extra: Buffer) => console.log(peer, extra))
// @ts-expect-error delete passes no value
seed.on('delete', (peer: string, key: string, value: Value) => console.log(peer, key, value))
// @ts-expect-error update carries a Value
seed.emit('update', 'peer', 'key', () => 1)
// @ts-expect-error peer_alive passes the peer name
seed.emit('peer_alive', 42)

// @ts-expect-error the port is a number
new Gossiper('9000')
// @ts-expect-error seeds are strings
new Gossiper(9000, [9001])
// @ts-expect-error unknown option
new Gossiper({ interval: 1000 })

// State.
seed.setLocalState('s', 'text')
seed.setLocalState('n', 42)
seed.setLocalState('b', false)
seed.setLocalState('z', null)
seed.setLocalState('buf', Buffer.from('raw'))
seed.setLocalState('u8', new Uint8Array([1, 2]))
seed.setLocalState('obj', { list: [1, { deep: true }], bin: Buffer.alloc(2) })
// @ts-expect-error a function cannot be gossiped
seed.setLocalState('fn', () => 1)
// @ts-expect-error keys are strings
seed.setLocalState(1, 'x')
seed.setLocalState('lease', { holder: 'me' }, { ttl: 10_000 })
seed.setLocalState('forever', 1, {})
// @ts-expect-error ttl is a number of milliseconds
seed.setLocalState('lease', 1, { ttl: '10s' })
// @ts-expect-error the only option is ttl
seed.setLocalState('lease', 1, { expires: 10 })
const existed: boolean = seed.deleteLocalState('lease')
// @ts-expect-error keys are strings
seed.deleteLocalState(1)
const mine: Value | undefined = seed.getLocalState('s')
const theirs: Value | undefined = seed.peerValue('127.0.0.1:9001', 's')
if (typeof theirs === 'string') console.log(theirs.length)
else if (Buffer.isBuffer(theirs)) console.log(theirs.byteLength)
const keys: string[] = seed.peerKeys('127.0.0.1:9001')
const everyone: string[] = [...seed.allPeers(), ...seed.livePeers(), ...seed.deadPeers()]

// Monitoring.
const details: PeerDetail[] = seed.peerDetails()
for (const d of details) {
  const row: [string, number, number, number, boolean, boolean, number, number] =
    [d.name, d.generation, d.heartbeat, d.maxVersion, d.live, d.left, d.phi, d.horizon]
  console.log(row)
}
const stats: GossiperStats = seed.stats()
const traffic: number = stats.messagesSent + stats.messagesReceived + stats.bytesSent + stats.bytesReceived
const work: number = stats.exchanges + stats.pushesSent + stats.connectFailures + stats.connectionsRefused
const dropped: number = stats.rejected.malformed + stats.rejected.wrongCluster + stats.rejected.oversized
const refused: number = stats.rejected.tooManyPeers + stats.rejected.frameBudget + stats.rejected.inboundFull + stats.connectsSkipped
const byDatagram: number = stats.datagramExchanges + stats.rejected.unsolicited
// @ts-expect-error not a rejection reason
console.log(stats.rejected.nonsense)
const refusedByKeys: number = stats.plaintextAccepted + stats.rejected.plaintext + stats.rejected.unknownKey +
  stats.rejected.forged + stats.rejected.stale + stats.rejected.replayed

// Keys: install, use, remove, list; options show them redacted.
const installed: boolean = configured.installKey(Buffer.alloc(32))
configured.useKey('AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=')
const removed: boolean = configured.removeKey(new Uint8Array(32))
const listed: string[] = configured.listKeys()
const redacted: readonly '[redacted]'[] | undefined = configured.options.keys
// @ts-expect-error keys are bytes or base64 text
configured.installKey(42)

// ref/unref return the gossiper.
const same: Gossiper = seed.unref().ref()

// Start and stop: promises and callbacks.
async function lifecycle(): Promise<void> {
  await seed.start()
  const name: string | undefined = seed.peer_name
  console.log(name?.split(':'))
  await peer.stop()
  const pending: Promise<void> = peer.start((err) => {
    const e: Error | null = err
    if (e) console.error(e.message)
  })
  await pending
  peer.stop((err) => console.log(err === null))
  await Promise.all([seed.stop(), bare.start().then(() => bare.stop())])
  // @ts-expect-error the callback gets an error, not a string
  seed.start((err: string) => console.log(err))
}

void lifecycle
void [interval, noAddress, defaultSeeds, cluster, bound, chained, emitted, mine, keys, everyone]
void [traffic, work, dropped, same, fromConst, viaDefault, viaRequire, viaDefaultOfRequire]
