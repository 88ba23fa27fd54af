'use strict'
// One host of the multi-host suite, run inside its network namespace:
//   ip netns exec gshN node host-node.js '{"port":7946,"seeds":["node1:7946"],...}'
// argv[2] is the Gossiper options (JSON). It talks to the test in JSON lines:
//   stdout, events:  {event:'started', peer_name, t} | {event:'error', code, message}
//                    {event:'new_peer'|'peer_failed'|'peer_alive', peer, t}
//                    {event:'update', peer, key, value, t}
//   stdin, commands: {id, cmd:'set', key, value} -> {id, ok:true, t}
//                    {id, cmd:'get'} -> {id, ok:true, state:{peer_name, livePeers, deadPeers, values, details}}
//                    (values: {peer: {key: value}}, this host included; details: peerDetails())
//                    {id, cmd:'stop'} / {id, cmd:'start'} -> {id, ok:true, peer_name}
//   a failed command answers {id, ok:false, error}. `t` is Date.now() (one clock on the machine).
// The process ends when stdin closes (the test went away), or when killed.
const readline = require('node:readline')
const { Gossiper } = require('../..')

function report(message) {
  process.stdout.write(JSON.stringify(message) + '\n')
}

const options = JSON.parse(process.argv[2])
const gossiper = new Gossiper(options)

for (const event of ['new_peer', 'peer_failed', 'peer_alive']) {
  gossiper.on(event, (peer) => report({ event, peer, t: Date.now() }))
}
gossiper.on('update', (peer, key, value) => report({ event: 'update', peer, key, value, t: Date.now() }))

function snapshot() {
  const self = gossiper.peer_name
  const peers = gossiper.allPeers()
  const values = {}
  for (const peer of self === undefined ? peers : [self, ...peers]) {
    const entries = {}
    for (const key of gossiper.peerKeys(peer)) entries[key] = gossiper.peerValue(peer, key)
    values[peer] = entries
  }
  return { peer_name: self, livePeers: gossiper.livePeers(), deadPeers: gossiper.deadPeers(), values, details: gossiper.peerDetails() }
}

const commands = {
  set({ key, value }) {
    gossiper.setLocalState(key, value)
    return { t: Date.now() }
  },
  get() {
    return { state: snapshot() }
  },
  async stop() {
    await gossiper.stop()
    return { peer_name: gossiper.peer_name }
  },
  async start() {
    await gossiper.start()
    return { peer_name: gossiper.peer_name }
  },
}

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  let request
  try {
    request = JSON.parse(line)
  } catch {
    report({ event: 'bad_command', line })
    return
  }
  const handler = commands[request.cmd]
  try {
    if (!handler) throw new Error(`unknown command ${request.cmd}`)
    report({ id: request.id, ok: true, ...(await handler(request)) })
  } catch (error) {
    report({ id: request.id, ok: false, error: `${error.code ?? error.name}: ${error.message}` })
  }
}).on('close', () => process.exit(0))

gossiper.start().then(() => {
  report({ event: 'started', peer_name: gossiper.peer_name, t: Date.now() })
}, (error) => {
  report({ event: 'error', code: error.code, message: error.message })
  process.exit(1)
})
