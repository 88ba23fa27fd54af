'use strict'
// One gossiper in a process of its own, for the failure scenario (bench/scenarios.js forks it).
// argv[2] is JSON { seed, interval }. Talks to its parent over IPC:
//   sends   { type: 'started', name }                  once listening
//   answers { cmd: 'status' } with { type: 'status', live: [peer names] }
//   on      { cmd: 'stop' }: calls stop(), sends { type: 'stopped', ms }, then exits by itself
// It exits when the parent goes away, so a crashed benchmark leaves no stray process.

const { Gossiper } = require('..')

const { seed, interval } = JSON.parse(process.argv[2])
const extra = { clusterName: process.env.BENCH_CLUSTER, ...JSON.parse(process.env.BENCH_GOSSIPER_OPTIONS || '{}') }
const gossiper = new Gossiper({ ...extra, port: 0, address: '127.0.0.1', seeds: [seed], gossipInterval: interval })

process.on('disconnect', () => process.exit(0))

process.on('message', (message) => {
  if (message.cmd === 'status') {
    process.send({ type: 'status', live: gossiper.livePeers() })
  } else if (message.cmd === 'stop') {
    const begun = performance.now()
    gossiper.stop().then(() => {
      // Disconnecting lets the process end by itself once the send is flushed.
      process.send({ type: 'stopped', ms: performance.now() - begun }, () => process.disconnect())
    })
  }
})

gossiper.start().then(
  () => process.send({ type: 'started', name: gossiper.peer_name }),
  (error) => {
    process.send({ type: 'error', message: error.message }, () => process.exit(1))
  },
)
