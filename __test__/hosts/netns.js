'use strict'
// Network namespaces for the multi-host suite: one namespace per host (gsh1..gshN, eth0 with
// 10.231.0.(10+i)/24, host names node1..nodeN through /etc/netns/<ns>/hosts) and one namespace,
// gsnet, holding the bridges the hosts' veth pairs are plugged into. Nothing is created in the
// root namespace: each veth pair is created inside gsnet with its other end placed straight
// into the host namespace.
//
// Everything created is removed by teardown(), by a process 'exit' handler, on SIGINT/SIGTERM/
// SIGHUP, and (left by a run that was SIGKILLed) by cleanLeftovers() at the start of the next.
// A lock file keeps two runs on the machine (say, two worktrees) from sharing the names.

const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const BRIDGE_NS = 'gsnet'
const PROBE_NS = 'gsprobe'
const SUBNET = '10.231.0'
const OUR_NAMESPACE = /^gs(?:net|probe|h\d+)$/
const NETNS_ETC = '/etc/netns'
const LOCK_FILE = '/run/gossiper-hosts.lock'
// The runner takes the lock for the whole run and hands it down to the test files.
const LOCK_ENV = 'GOSSIPER_HOSTS_LOCK'

const hostNs = (i) => `gsh${i}`
const hostIp = (i) => `${SUBNET}.${10 + i}`
const hostName = (i) => `node${i}`
const bridgePort = (i) => `vgsh${i}`

/** Runs `ip ...args`; returns stdout, throws with stderr on failure. */
function ip(args, { allowFailure = false } = {}) {
  const result = spawnSync('ip', args, { encoding: 'utf8', timeout: 10000 })
  if (result.error || result.status !== 0) {
    if (allowFailure) return null
    const why = result.error ? result.error.message : (result.stderr || '').trim() || `exit status ${result.status}`
    throw new Error(`ip ${args.join(' ')}: ${why}`)
  }
  return result.stdout
}

function namespaces() {
  const out = ip(['netns', 'list'], { allowFailure: true }) ?? ''
  return out.split('\n').map((line) => line.split(/\s+/)[0]).filter(Boolean)
}

function alive(pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return error.code === 'EPERM'
  }
}

// Processes still inside one of our namespaces are hosts this suite started (possibly by a run
// that was killed): end them by pid so that the namespace and its links really go away.
function killProcessesIn(ns) {
  const out = ip(['netns', 'pids', ns], { allowFailure: true }) ?? ''
  for (const pid of out.split(/\s+/).filter(Boolean).map(Number)) {
    if (pid !== process.pid) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {}
    }
  }
}

function removeEtcDir(ns) {
  fs.rmSync(path.join(NETNS_ETC, ns), { recursive: true, force: true })
}

// /etc/netns does not exist on a machine where no namespace has per-namespace files; leave it
// as found: removed once nothing is left in it.
function removeEtcRootIfEmpty() {
  try {
    fs.rmdirSync(NETNS_ETC)
  } catch {}
}

/** Removes every namespace, link and /etc/netns directory of this suite, whoever left them. */
function cleanLeftovers() {
  const found = namespaces().filter((ns) => OUR_NAMESPACE.test(ns))
  for (const ns of found) killProcessesIn(ns)
  // Deleting gsnet destroys the bridges and every veth pair (both ends) with it.
  for (const ns of found) ip(['netns', 'del', ns], { allowFailure: true })
  let etc = []
  try {
    etc = fs.readdirSync(NETNS_ETC)
  } catch {}
  for (const ns of etc.filter((name) => OUR_NAMESPACE.test(name))) removeEtcDir(ns)
  removeEtcRootIfEmpty()
  const still = namespaces().filter((ns) => OUR_NAMESPACE.test(ns))
  if (still.length > 0) throw new Error(`could not remove namespaces ${still.join(', ')}`)
  return found
}

// ---- the lock ----

let lockHeld = false

function acquireLock() {
  if (lockHeld) return
  installHandlers()
  const inherited = process.env[LOCK_ENV]
  for (let attempt = 0; attempt < 3; attempt++) {
    let holder = null
    try {
      fs.writeFileSync(LOCK_FILE, String(process.pid), { flag: 'wx' })
      lockHeld = true
      return
    } catch (error) {
      if (error.code !== 'EEXIST') throw new Error(`cannot create the lock ${LOCK_FILE}: ${error.message}`)
      holder = Number(fs.readFileSync(LOCK_FILE, 'utf8').trim())
    }
    if (inherited && holder === Number(inherited)) return
    if (Number.isInteger(holder) && holder > 0 && holder !== process.pid && alive(holder)) {
      throw new Error(`another run of the hosts suite (pid ${holder}, lock ${LOCK_FILE}) is using the gs* namespaces; wait for it to end`)
    }
    // Stale: its process is gone.
    fs.rmSync(LOCK_FILE, { force: true })
  }
  throw new Error(`cannot take the lock ${LOCK_FILE}`)
}

function releaseLock() {
  if (!lockHeld) return
  lockHeld = false
  try {
    if (Number(fs.readFileSync(LOCK_FILE, 'utf8').trim()) === process.pid) fs.rmSync(LOCK_FILE, { force: true })
  } catch {}
}

// ---- support ----

let supportChecked
/**
 * null when this machine can run the suite, else the reason it cannot (for a skip message).
 * Needs root, `ip netns`, bridges and veth pairs; probed in a namespace of its own.
 */
function unsupportedReason() {
  if (supportChecked !== undefined) return supportChecked
  supportChecked = probe()
  return supportChecked
}

function probe() {
  if (process.platform !== 'linux') return `needs Linux network namespaces (this is ${process.platform})`
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return 'needs root (creates network namespaces)'
  const version = spawnSync('ip', ['-V'], { encoding: 'utf8', timeout: 10000 })
  if (version.error || version.status !== 0) return 'needs the `ip` command (iproute2)'
  if (ip(['netns', 'list'], { allowFailure: true }) === null) return '`ip netns` is not supported here'
  // From here on namespaces are created: not while another run uses them (throws if one does).
  acquireLock()
  ip(['netns', 'del', PROBE_NS], { allowFailure: true })
  if (ip(['netns', 'add', PROBE_NS], { allowFailure: true }) === null) {
    const why = spawnSync('ip', ['netns', 'add', PROBE_NS], { encoding: 'utf8' }).stderr.trim()
    ip(['netns', 'del', PROBE_NS], { allowFailure: true })
    return `cannot create a network namespace (${why || 'ip netns add failed'})`
  }
  try {
    if (ip(['-n', PROBE_NS, 'link', 'add', 'gsprobe-br', 'type', 'bridge'], { allowFailure: true }) === null) {
      return 'cannot create a bridge inside a network namespace'
    }
    if (ip(['-n', PROBE_NS, 'link', 'add', 'gsprobe-a', 'type', 'veth', 'peer', 'name', 'gsprobe-b'], { allowFailure: true }) === null) {
      return 'cannot create a veth pair inside a network namespace'
    }
    const exec = spawnSync('ip', ['netns', 'exec', PROBE_NS, process.execPath, '-e', '0'], { encoding: 'utf8', timeout: 20000 })
    if (exec.error || exec.status !== 0) return `cannot run node inside a network namespace: ${(exec.stderr || exec.error?.message || '').trim()}`
    return null
  } finally {
    ip(['netns', 'del', PROBE_NS], { allowFailure: true })
  }
}

// ---- the network ----

const created = { namespaces: [], etcDirs: [] }
let handlersInstalled = false
let handleSignals = true

/** The runner handles signals itself (it waits for the test process before cleaning up). */
function leaveSignalsToCaller() {
  handleSignals = false
}

function cleanupSync() {
  // Hosts first, so that nothing holds a namespace open (see killProcessesIn).
  for (const ns of created.namespaces) killProcessesIn(ns)
  for (const ns of [...created.namespaces].reverse()) ip(['netns', 'del', ns], { allowFailure: true })
  created.namespaces.length = 0
  for (const ns of created.etcDirs) removeEtcDir(ns)
  created.etcDirs.length = 0
  removeEtcRootIfEmpty()
}

function installHandlers() {
  if (handlersInstalled) return
  handlersInstalled = true
  process.on('exit', () => {
    cleanupSync()
    releaseLock()
  })
  if (!handleSignals) return
  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]]) {
    process.on(signal, () => {
      process.stderr.write(`hosts suite: ${signal}, removing its namespaces\n`)
      cleanupSync()
      releaseLock()
      process.exit(code)
    })
  }
}

class Network {
  /** `count` host namespaces on one bridge, plus a second bridge for partitions. */
  constructor(count) {
    this.count = count
    this.indices = Array.from({ length: count }, (_, k) => k + 1)
    this.onSecondBridge = new Set()
  }

  setup() {
    installHandlers()
    acquireLock()
    cleanLeftovers()
    const nsAdd = (ns) => {
      ip(['netns', 'add', ns])
      created.namespaces.push(ns)
      ip(['-n', ns, 'link', 'set', 'lo', 'up'])
    }
    nsAdd(BRIDGE_NS)
    for (const bridge of ['br0', 'br1']) {
      ip(['-n', BRIDGE_NS, 'link', 'add', bridge, 'type', 'bridge'])
      ip(['-n', BRIDGE_NS, 'link', 'set', bridge, 'up'])
    }
    const hosts = ['127.0.0.1 localhost', '::1 localhost ip6-localhost ip6-loopback',
      ...this.indices.map((i) => `${hostIp(i)} ${hostName(i)}`)].join('\n') + '\n'
    fs.mkdirSync(NETNS_ETC, { recursive: true })
    for (const i of this.indices) {
      const ns = hostNs(i)
      nsAdd(ns)
      ip(['-n', BRIDGE_NS, 'link', 'add', bridgePort(i), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns])
      ip(['-n', BRIDGE_NS, 'link', 'set', bridgePort(i), 'master', 'br0', 'up'])
      ip(['-n', ns, 'addr', 'add', `${hostIp(i)}/24`, 'dev', 'eth0'])
      ip(['-n', ns, 'link', 'set', 'eth0', 'up'])
      created.etcDirs.push(ns)
      fs.mkdirSync(path.join(NETNS_ETC, ns), { recursive: true })
      fs.writeFileSync(path.join(NETNS_ETC, ns, 'hosts'), hosts)
    }
    return this
  }

  /** Moves the bridge ends of `group`'s veths to br1: they reach each other, not the rest. */
  partition(group) {
    for (const i of group) {
      ip(['-n', BRIDGE_NS, 'link', 'set', bridgePort(i), 'master', 'br1'])
      this.onSecondBridge.add(i)
    }
  }

  /** Puts every veth back on br0. */
  heal() {
    for (const i of [...this.onSecondBridge]) {
      ip(['-n', BRIDGE_NS, 'link', 'set', bridgePort(i), 'master', 'br0'])
      this.onSecondBridge.delete(i)
    }
  }

  teardown() {
    cleanupSync()
    releaseLock()
  }
}

module.exports = {
  leaveSignalsToCaller,
  BRIDGE_NS,
  LOCK_ENV,
  Network,
  acquireLock,
  releaseLock,
  cleanLeftovers,
  unsupportedReason,
  namespaces,
  hostNs,
  hostIp,
  hostName,
  OUR_NAMESPACE,
  NETNS_ETC,
}
