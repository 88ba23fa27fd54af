'use strict'
// Hosts of the multi-host suite: one Node process per network namespace (host-node.js), driven
// over stdin/stdout JSON lines. Every wait polls the hosts' state against a deadline and fails
// with what was still missing; nothing sleeps and hopes.

const path = require('node:path')
const { test } = require('node:test')
const { spawn } = require('node:child_process')
const { hostNs, hostIp, hostName } = require('./netns')

const FIXTURE = path.join(__dirname, 'host-node.js')
const PORT = 7946
const POLL_MS = 100

const addressOf = (i) => `${hostIp(i)}:${PORT}`

function isLoopbackName(name) {
  return /^127\./.test(name) || /^\[::1\]/.test(name) || /^\[::ffff:127\./i.test(name) || /^localhost/i.test(name)
}

/** Prints one figures line: `HOSTS {json}` (the runner repeats them all at the end). */
function printFigures(figures) {
  process.stdout.write(`HOSTS ${JSON.stringify(figures)}\n`)
}

class Host {
  /** `tracker(name, how)` is told of every peer name this host reports, in events or state. */
  constructor(index, options, tracker) {
    this.index = index
    this.label = hostName(index)
    this.options = options
    this.tracker = tracker
    this.incarnation = 0
    this.child = null
  }

  /** Spawns the process in its namespace and waits for its 'started' report. */
  async start(timeoutMs = 20000) {
    this.incarnation++
    this.events = []
    this.pending = new Map()
    this.nextId = 1
    this.stderr = ''
    this.exit = null
    this.expectedExit = false
    this.peerName = undefined
    const child = spawn('ip', ['netns', 'exec', hostNs(this.index), process.execPath, FIXTURE, JSON.stringify(this.options)], {
      stdio: ['pipe', 'pipe', 'pipe'],
    })
    this.child = child
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => {
      this.exit = { code, signal }
      const why = new Error(`${this.label} exited (code ${code}, signal ${signal}); stderr: ${this.stderr.trim() || '(empty)'}`)
      for (const { reject } of this.pending.values()) reject(why)
      this.pending.clear()
      resolve(this.exit)
    }))
    child.on('error', () => {})
    child.stdin.on('error', () => {})
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk) => { this.stderr += chunk })
    let partial = ''
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk) => {
      partial += chunk
      let newline
      while ((newline = partial.indexOf('\n')) >= 0) {
        const line = partial.slice(0, newline)
        partial = partial.slice(newline + 1)
        let message
        try {
          message = JSON.parse(line)
        } catch {
          continue
        }
        this.receive(message)
      }
    })

    const started = await Promise.race([
      new Promise((resolve) => { this.onStarted = resolve }),
      this.exited.then(({ code, signal }) => {
        throw new Error(`${this.label} exited before starting (code ${code}, signal ${signal}); stderr: ${this.stderr.trim()}`)
      }),
      deadline(timeoutMs, `${this.label} did not report 'started' within ${timeoutMs} ms; stderr: ${this.stderr}`),
    ])
    this.peerName = started.peer_name
    this.startedAt = started.t
    this.tracker(started.peer_name, `${this.label} calls itself`)
    return started
  }

  receive(message) {
    if (message.id !== undefined) {
      const waiter = this.pending.get(message.id)
      if (!waiter) return
      this.pending.delete(message.id)
      if (message.ok) waiter.resolve(message)
      else waiter.reject(new Error(`${this.label}: ${message.error}`))
      return
    }
    if (message.event === 'started') {
      this.onStarted?.(message)
      return
    }
    if (message.event === 'error') {
      this.stderr += `start failed: ${message.code} ${message.message}\n`
      return
    }
    this.events.push(message)
    if (message.peer !== undefined) this.tracker(message.peer, `${this.label} '${message.event}' event`)
  }

  request(cmd, fields = {}, timeoutMs = 5000) {
    if (this.exit) return Promise.reject(new Error(`${this.label} has exited (${JSON.stringify(this.exit)}); stderr: ${this.stderr.trim()}`))
    const id = this.nextId++
    return Promise.race([
      new Promise((resolve, reject) => {
        this.pending.set(id, { resolve, reject })
        this.child.stdin.write(JSON.stringify({ id, cmd, ...fields }) + '\n')
      }),
      deadline(timeoutMs, `${this.label} did not answer '${cmd}' within ${timeoutMs} ms`),
    ]).finally(() => this.pending.delete(id))
  }

  /** Writes key = value on this host; resolves with the host's clock at the write. */
  async set(key, value) {
    return (await this.request('set', { key, value })).t
  }

  async state() {
    const { state } = await this.request('get')
    for (const name of [...state.livePeers, ...state.deadPeers, ...Object.keys(state.values)]) {
      this.tracker(name, `${this.label} peer list`)
    }
    return state
  }

  /** First time this host reported update (peer, key, value) in its current incarnation. */
  updateTime(peer, key, value) {
    return this.events.find((e) => e.event === 'update' && e.peer === peer && e.key === key && e.value === value)?.t
  }

  /** SIGKILL, and wait until the process is gone. */
  async kill(timeoutMs = 5000) {
    if (!this.child || this.exit) return this.exit
    this.expectedExit = true
    this.child.kill('SIGKILL')
    return Promise.race([this.exited, deadline(timeoutMs, `${this.label} still runs ${timeoutMs} ms after SIGKILL`)])
  }

  /** Closes stdin (the host exits by itself), SIGKILL after `timeoutMs`. */
  async close(timeoutMs = 5000) {
    if (!this.child || this.exit) return
    this.expectedExit = true
    this.child.stdin.end()
    try {
      await Promise.race([this.exited, deadline(timeoutMs, 'exit')])
    } catch {
      await this.kill().catch(() => {})
    }
  }
}

function deadline(ms, message) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(message)), ms)
    timer.unref()
  })
}

class Cluster {
  /** `optionsFor(i)`: the Gossiper options of host i (1-based). */
  constructor(count, optionsFor) {
    this.indices = Array.from({ length: count }, (_, k) => k + 1)
    this.seen = new Map()
    const tracker = (name, how) => {
      if (!this.seen.has(name)) this.seen.set(name, new Set())
      const ways = this.seen.get(name)
      if (ways.size < 12) ways.add(how)
    }
    // GOSSIPER_HOSTS_EXPLICIT_ADDRESS=1 gives every host `address`: a check of the harness
    // itself, independent of how the engine picks an address when it has none.
    const explicit = process.env.GOSSIPER_HOSTS_EXPLICIT_ADDRESS === '1'
    this.hosts = this.indices.map((i) => new Host(i, {
      port: PORT,
      ...optionsFor(i),
      ...(explicit ? { address: hostIp(i) } : {}),
    }, tracker))
  }

  host(i) {
    return this.hosts[i - 1]
  }

  /** Starts host 1, then the others at once; resolves with the time the last one started. */
  async start() {
    await this.hosts[0].start()
    await Promise.all(this.hosts.slice(1).map((h) => h.start()))
    return Math.max(...this.hosts.map((h) => h.startedAt))
  }

  async states(hosts = this.hosts) {
    return Promise.all(hosts.map((h) => h.state()))
  }

  /**
   * Polls every host's state until `check(states)` returns true; anything else it returns
   * (a string saying what is missing) goes into the timeout error. Resolves with the elapsed
   * ms and the last states.
   */
  async waitUntil(what, timeoutMs, check, { hosts = this.hosts, pollMs = POLL_MS } = {}) {
    const begin = Date.now()
    const end = begin + timeoutMs
    let missing = 'not checked yet'
    for (;;) {
      const states = await this.states(hosts)
      const verdict = check(states)
      if (verdict === true) return { ms: Date.now() - begin, states }
      missing = verdict
      if (Date.now() >= end) {
        throw new Error(`timed out after ${(timeoutMs / 1000).toFixed(1)} s waiting for ${what}: ${missing}`)
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(pollMs, Math.max(0, end - Date.now()))))
    }
  }

  /** Every host in `group` sees exactly the others of `group` live (and none failed unless `noneFailed`). */
  membership(group = this.indices, { expectLive = group, noneFailed = true } = {}) {
    return (states) => {
      const problems = []
      states.forEach((state, k) => {
        const i = group[k]
        const expected = expectLive.filter((j) => j !== i).map(addressOf).sort()
        const live = [...state.livePeers].sort()
        const ok = sameList(live, expected) && (!noneFailed || state.deadPeers.length === 0)
        if (!ok) problems.push(`${hostName(i)} (${state.peer_name}) live [${live.join(', ')}] failed [${state.deadPeers.join(', ')}]`)
      })
      return problems.length === 0 ? true : `expected each to see ${expectLive.length - 1} live peers (the others' 10.231.0.x:${PORT}); ${problems.join('; ')}`
    }
  }

  /** Every host in `group` holds `values`: a list of [writer index, key, value], except its own. */
  holding(group, values) {
    return (states) => {
      const problems = []
      states.forEach((state, k) => {
        const i = group[k]
        const lacking = values.filter(([writer, key, value]) => writer !== i && state.values[addressOf(writer)]?.[key] !== value)
        if (lacking.length > 0) {
          problems.push(`${hostName(i)} lacks ${lacking.map(([w, key, value]) => `${hostName(w)}.${key}=${JSON.stringify(value)} (has ${JSON.stringify(state.values[addressOf(w)]?.[key])})`).join(', ')}`)
        }
      })
      return problems.length === 0 ? true : problems.join('; ')
    }
  }

  /** Names reported anywhere (events, peer lists, own name) that are not one of the hosts' addresses. */
  strangeNames() {
    const expected = new Set(this.indices.map(addressOf))
    return [...this.seen].filter(([name]) => !expected.has(name)).map(([name, ways]) => ({
      name,
      loopback: isLoopbackName(name),
      seenIn: [...ways],
    }))
  }

  /** Latest arrival of (writer's key = value) over the other hosts, in ms after `writtenAt`. */
  spreadMs(writer, key, value, writtenAt, hosts = this.hosts) {
    const times = hosts.filter((h) => h.index !== writer).map((h) => h.updateTime(addressOf(writer), key, value))
    if (times.some((t) => t === undefined)) return null
    return Math.max(...times) - writtenAt
  }

  async close() {
    await Promise.all(this.hosts.map((h) => h.close()))
  }
}

function sameList(a, b) {
  return a.length === b.length && a.every((x, k) => x === b[k])
}

/** Checks every host calls itself by its own address; returns the list of mismatches. */
function misnamedHosts(hosts) {
  return hosts
    .filter((h) => h.peerName !== addressOf(h.index))
    .map((h) => `${h.label} calls itself ${h.peerName}, expected ${addressOf(h.index)}`)
}

/**
 * A test that, when it fails, adds `id` to `failures` (for the figures line's status).
 * Steps of a scenario run in order and share its cluster.
 */
function stepper(failures) {
  return (id, name, fn) => test(name, async () => {
    try {
      await fn()
    } catch (error) {
      failures.push(id)
      throw error
    }
  })
}

module.exports = { stepper, Cluster, Host, PORT, addressOf, isLoopbackName, printFigures, misnamedHosts, hostName, hostIp }
