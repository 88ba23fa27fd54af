'use strict'
// Attacks on a 3-node cluster on loopback, with the figures the hostile-peers issue asks for.
//
//   node bench/attacks.js [--attacks names9k,names100k,keys2m,partial,slow] [--trials 3]
//                         [--package dir]
//
// The cluster runs in a child process of its own (this file, forked with --victim), so that its
// RSS and CPU, read from /proc, are the victim's alone; this process plays the attacker over raw
// TCP connections, with frames built as __test__/frames.js builds them. Each trial starts a fresh
// cluster. Results stream out as `ATTACK {json}` lines (one per trial, then one per attack with
// medians), and a table follows. `--package dir` loads the gossiper from another build, to
// measure the same attacks before a change.
//
//   names9k    9,000 forged names pushed into one node, twice a round apart (so that they count
//              as heard beating): how long that node's next writes take to reach its peers.
//   names100k  100,000 forged names, pushed twice likewise: the victim's RSS growth, its CPU in
//              each second for a minute (while the names are tried and fail), connection attempts.
//   keys2m     10 frames of 200,000 tiny keys, each from a name of its own: RSS growth.
//   partial    150 connections each sending a 4 MiB frame but its last byte, held: peak RSS.
//   slow       1,030 connections on every node trickling a byte a second, reopened when closed,
//              for 40 s: false peer_failed, and how long writes take to reach every node.

const path = require('node:path')
const fs = require('node:fs')
const net = require('node:net')
const { fork } = require('node:child_process')
const { encodeValue } = require('../values')
const { frame, PUSH } = require('../__test__/frames')

const ATTACKS = ['names9k', 'names100k', 'keys2m', 'partial', 'slow']
const CLUSTER = `attacks-${process.pid}`
const PAGE_KB = 4
const TICKS = 100 // clock ticks a second in /proc/<pid>/stat

// ---- the victim: three gossipers in one child process --------------------------------------

function victim(packageDir) {
  const { Gossiper } = require(path.resolve(packageDir))
  const nodes = []
  const names = []
  let falseFailures = 0

  async function start() {
    for (let i = 0; i < 3; i++) {
      const seeds = i === 0 ? [] : [names[0]]
      const g = new Gossiper({ port: 0, address: '127.0.0.1', seeds, clusterName: CLUSTER_OF_CHILD })
      g.on('peer_failed', (peer) => { if (names.includes(peer)) falseFailures++ })
      await g.start()
      nodes.push(g)
      names.push(g.peer_name)
    }
    for (;;) {
      if (nodes.every((g) => names.every((n) => n === g.peer_name || g.livePeers().includes(n)))) break
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    process.send({ type: 'ready', names, pid: process.pid })
  }

  function write(writer, key) {
    const started = performance.now()
    const arrivals = nodes.filter((_, i) => i !== writer).map((g) => new Promise((resolve) => {
      const onUpdate = (peer, k) => {
        if (peer !== names[writer] || k !== key) return
        g.off('update', onUpdate)
        resolve(performance.now() - started)
      }
      g.on('update', onUpdate)
      setTimeout(() => { g.off('update', onUpdate); resolve(null) }, 10000)
    }))
    nodes[writer].setLocalState(key, { at: Date.now() })
    Promise.all(arrivals).then((ms) => process.send({ type: 'written', key, ms }))
  }

  process.on('disconnect', () => process.exit(0))
  process.on('message', (message) => {
    if (message.cmd === 'write') write(message.writer, message.key)
    else if (message.cmd === 'status') {
      process.send({
        type: 'status',
        falseFailures,
        live: nodes.map((g) => g.livePeers().length),
        known: nodes.map((g) => g.allPeers().length),
        stats: nodes.map((g) => g.stats()),
      })
    }
  })
  const CLUSTER_OF_CHILD = process.env.ATTACK_CLUSTER
  start().catch((error) => { console.error(error); process.exit(1) })
}

/** Forks the victim; resolves with { child, names, request(cmd), rss(), cpuSeconds() }. */
async function startVictim(packageDir) {
  const child = fork(__filename, ['--victim', packageDir], {
    env: { ...process.env, ATTACK_CLUSTER: CLUSTER },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  })
  const waiters = []
  child.on('message', (message) => {
    const i = waiters.findIndex((w) => w.type === message.type && (!w.key || w.key === message.key))
    if (i >= 0) waiters.splice(i, 1)[0].resolve(message)
  })
  const next = (type, key, ms = 30000) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`victim: no '${type}' within ${ms} ms`)), ms)
    waiters.push({ type, key, resolve: (m) => { clearTimeout(timer); resolve(m) } })
  })
  const ready = await next('ready')
  const proc = (file) => fs.readFileSync(`/proc/${child.pid}/${file}`, 'utf8')
  return {
    child,
    names: ready.names,
    ports: ready.names.map((n) => Number(n.split(':').pop())),
    status: () => { child.send({ cmd: 'status' }); return next('status') },
    write: (writer, key) => { child.send({ cmd: 'write', writer, key }); return next('written', key) },
    rssMB: () => Number(/VmRSS:\s+(\d+)/.exec(proc('status'))[1]) / 1024,
    cpuSeconds: () => {
      const fields = proc('stat').split(') ')[1].split(' ')
      return (Number(fields[11]) + Number(fields[12])) / TICKS
    },
    stop: () => new Promise((resolve) => { child.once('exit', resolve); child.kill('SIGKILL') }),
  }
}

/** Samples the victim's RSS and CPU every `everyMs`; `stop()` returns the figures. */
function sample(v, everyMs = 1000) {
  const rss = [v.rssMB()]
  const cores = []
  let cpu = v.cpuSeconds()
  let at = performance.now()
  const timer = setInterval(() => {
    const nowCpu = v.cpuSeconds()
    const now = performance.now()
    cores.push((nowCpu - cpu) / ((now - at) / 1000))
    cpu = nowCpu
    at = now
    rss.push(v.rssMB())
  }, everyMs)
  return () => {
    clearInterval(timer)
    return {
      rssPeakMB: round1(Math.max(...rss)),
      cpuMaxCores: round2(Math.max(0, ...cores)),
      cpuMeanCores: round2(cores.length ? cores.reduce((a, b) => a + b, 0) / cores.length : 0),
    }
  }
}

// ---- frames ---------------------------------------------------------------------------------

const FROM = '127.0.0.1:1'

/** A keyless delta for a name no node has: [name, generation, heartbeat, from, to, left, kvs]. */
function fakeDelta(i, heartbeat) {
  // Half of them in 127.66/16 (loopback, refused at once), half in 10.66/16 (no answer).
  const net8 = i % 2 === 0 ? 127 : 10
  return [`${net8}.66.${(i >> 8) & 255}.${i & 255}:${7000 + (i >> 16)}`, 1, heartbeat, 0, 0, false, []]
}

function fakePushes(count, heartbeat, perFrame = 8000) {
  const frames = []
  for (let first = 0; first < count; first += perFrame) {
    const deltas = []
    for (let i = first; i < Math.min(count, first + perFrame); i++) deltas.push(fakeDelta(i, heartbeat))
    frames.push(frame(PUSH, [deltas, []], { cluster: CLUSTER, from: FROM }))
  }
  return frames
}

/** A Push of `count` one-byte keys of `name`, sent by `name` itself. */
function tinyKeys(name, count) {
  const value = encodeValue(1)
  const kvs = []
  for (let v = 1; v <= count; v++) kvs.push([`k${v}`, v, value])
  return frame(PUSH, [[[name, 1, 1, 0, count, false, kvs]], []], { cluster: CLUSTER, from: name })
}

/** Writes each frame on a fresh connection to `port`; resolves once all are closed. */
function sendFrames(port, frames) {
  return Promise.all(frames.map((bytes) => new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.end(bytes))
    socket.on('error', () => {})
    socket.on('close', resolve)
    socket.resume()
  })))
}

// ---- attacks ----------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const round1 = (x) => Math.round(x * 10) / 10
const round2 = (x) => Math.round(x * 100) / 100
const last = (ms) => (ms.includes(null) ? null : round1(Math.max(...ms)))

async function names9k(v) {
  await sendFrames(v.ports[0], fakePushes(9000, 1, 4500))
  await sleep(1100)
  await sendFrames(v.ports[0], fakePushes(9000, 2, 4500))
  await sleep(200)
  const writes = []
  for (let i = 0; i < 5; i++) {
    writes.push(last((await v.write(0, `after${i}`)).ms))
    await sleep(1000)
  }
  const status = await v.status()
  const later = writes.slice(1)
  return {
    // null: not everywhere within 10 s.
    nextWriteMs: writes[0],
    laterWritesMaxMs: later.includes(null) ? null : Math.max(...later),
    knownByVictim: status.known[0],
    falseFailures: status.falseFailures,
  }
}

async function names100k(v) {
  const rssBefore = v.rssMB()
  const stop = sample(v)
  await sendFrames(v.ports[0], fakePushes(100000, 1))
  await sleep(1100)
  await sendFrames(v.ports[0], fakePushes(100000, 2))
  await sleep(60000)
  const figures = stop()
  const status = await v.status()
  const stats = status.stats[0]
  return {
    rssBeforeMB: round1(rssBefore),
    ...figures,
    rssGrowthMB: round1(figures.rssPeakMB - rssBefore),
    rssAfterMB: round1(v.rssMB()),
    knownByVictim: status.known[0],
    connectFailures: stats.connectFailures,
    connectsSkipped: stats.connectsSkipped,
    tooManyPeers: stats.rejected.tooManyPeers,
    falseFailures: status.falseFailures,
  }
}

async function keys2m(v) {
  const rssBefore = v.rssMB()
  const stop = sample(v, 250)
  for (let i = 0; i < 10; i++) {
    await sendFrames(v.ports[0], [tinyKeys(`127.0.0.2:${1000 + i}`, 200000)])
  }
  await sleep(5000)
  const figures = stop()
  const status = await v.status()
  return {
    rssBeforeMB: round1(rssBefore),
    rssPeakMB: figures.rssPeakMB,
    rssGrowthMB: round1(figures.rssPeakMB - rssBefore),
    rssAfterMB: round1(v.rssMB()),
    tooManyKeys: status.stats[0].rejected.tooManyKeys,
    falseFailures: status.falseFailures,
  }
}

async function partial(v) {
  const rssBefore = v.rssMB()
  const stop = sample(v, 250)
  const size = 4 << 20
  const body = Buffer.alloc(size - 1, 0x90)
  const prefix = Buffer.alloc(4)
  prefix.writeUInt32BE(size)
  const sockets = []
  for (let i = 0; i < 150; i++) {
    const socket = net.connect(v.ports[0], '127.0.0.1', () => { socket.write(prefix); socket.write(body) })
    socket.on('error', () => {})
    socket.resume()
    sockets.push(socket)
  }
  await sleep(8000)
  const held = stop()
  for (const socket of sockets) socket.destroy()
  await sleep(5000)
  const status = await v.status()
  return {
    rssBeforeMB: round1(rssBefore),
    rssPeakMB: held.rssPeakMB,
    rssAfterCloseMB: round1(v.rssMB()),
    frameBudget: status.stats[0].rejected.frameBudget ?? null,
    falseFailures: status.falseFailures,
  }
}

async function slow(v, { perNode = 1030, seconds = 40 } = {}) {
  let stopped = false
  let opened = 0
  const open = (port) => {
    if (stopped) return
    opened++
    const socket = net.connect(port, '127.0.0.1')
    const trickle = setInterval(() => socket.write(Buffer.from([0])), 1000)
    socket.on('error', () => {})
    socket.on('close', () => {
      clearInterval(trickle)
      // Reopened at once: the slot is to stay taken.
      setImmediate(() => open(port))
    })
    socket.resume()
  }
  const stop = sample(v)
  for (const port of v.ports) for (let i = 0; i < perNode; i++) open(port)
  const writes = []
  const started = performance.now()
  let round = 0
  while (performance.now() - started < seconds * 1000) {
    await sleep(4000)
    writes.push(last((await v.write(round % 3, `slow${round}`)).ms))
    round++
  }
  stopped = true
  const figures = stop()
  const status = await v.status()
  return {
    seconds,
    ...figures,
    connectionsOpened: opened,
    writes: writes.length,
    writesSpread: writes.filter((ms) => ms !== null).length,
    writeMaxMs: writes.includes(null) ? null : Math.max(...writes),
    falseFailures: status.falseFailures,
    refused: status.stats.map((s) => s.connectionsRefused),
  }
}

// ---- driver ---------------------------------------------------------------------------------

function median(values) {
  const sorted = values.filter((x) => typeof x === 'number').sort((a, b) => a - b)
  return sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : null
}

function parseArgs(argv) {
  const options = { attacks: ATTACKS, trials: 3, packageDir: path.join(__dirname, '..') }
  for (let i = 0; i < argv.length; i++) {
    const value = () => argv[++i]
    switch (argv[i]) {
      case '--attacks': options.attacks = value().split(','); break
      case '--trials': options.trials = Number(value()); break
      case '--package': options.packageDir = value(); break
      default: throw new Error(`unknown argument '${argv[i]}'`)
    }
  }
  for (const a of options.attacks) if (!ATTACKS.includes(a)) throw new Error(`unknown attack '${a}'`)
  return options
}

async function main() {
  const { attacks, trials, packageDir } = parseArgs(process.argv.slice(2))
  const run = { names9k, names100k, keys2m, partial, slow }
  const summary = []
  for (const attack of attacks) {
    // The long attacks run once; the short ones `trials` times, for a median.
    const count = attack === 'names100k' || attack === 'slow' ? 1 : trials
    const results = []
    for (let t = 0; t < count; t++) {
      const v = await startVictim(packageDir)
      try {
        await sleep(2000)
        const result = { attack, trial: t + 1, ...(await run[attack](v)) }
        console.log('ATTACK ' + JSON.stringify(result))
        results.push(result)
      } finally {
        await v.stop()
      }
    }
    const keys = Object.keys(results[0]).filter((k) => k !== 'attack' && k !== 'trial')
    const medians = Object.fromEntries(keys.map((k) => [k, typeof results[0][k] === 'number' ? median(results.map((r) => r[k])) : results[0][k]]))
    const line = { attack, trials: count, ...medians }
    console.log('ATTACK ' + JSON.stringify({ ...line, median: true }))
    summary.push(line)
  }
  console.log('\nattack      figures (median of the trials)')
  for (const { attack, trials: _, ...figures } of summary) {
    console.log(attack.padEnd(11), Object.entries(figures).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(' '))
  }
}

if (process.argv[2] === '--victim') victim(process.argv[3])
else main().catch((error) => { console.error(error); process.exit(1) })
