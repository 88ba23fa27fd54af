'use strict'
// Scenario 4: one host is SIGKILLed and a fresh process is started at once in its namespace, on
// the same port. Its new writes reach everyone and its previous incarnation's values never win
// again: k = 'old' before the kill, k = 'new' after the restart, and every host holds 'new' for
// good.
//
// Seeds are IPs (node1 seeded by node2, the others by node1), no address option: each host's
// first seed is another host. This scenario is about incarnations, not about naming.

const { describe, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { Network, unsupportedReason } = require('./netns')
const { Cluster, stepper, addressOf, printFigures, misnamedHosts, hostName } = require('./cluster')

const COUNT = 6
const VICTIM = 4
const GOSSIP_INTERVAL = 1000
const STABLE_ROUNDS = 8
const FORM_TIMEOUT_MS = 20000
const SPREAD_TIMEOUT_MS = 10000
const RESTART_TIMEOUT_MS = 20000

const skip = unsupportedReason()
describe(`${COUNT} hosts, one SIGKILLed and restarted on the same port`, { skip: skip ?? false }, () => {
  const figures = { scenario: 'restart', hosts: COUNT, gossipInterval: GOSSIP_INTERVAL, status: 'incomplete', convergeMs: null, newSpreadMs: null }
  const failures = []
  const step = stepper(failures)
  const victimName = addressOf(VICTIM)
  let network
  let cluster
  let lastStart
  let killedAt

  before(async () => {
    network = new Network(COUNT).setup()
    cluster = new Cluster(COUNT, (i) => ({ seeds: [i === 1 ? addressOf(2) : addressOf(1)], gossipInterval: GOSSIP_INTERVAL }))
    lastStart = await cluster.start()
  })

  after(async () => {
    await cluster?.close()
    network?.teardown()
    figures.status = failures.length === 0 ? 'ok' : `failed: ${failures.join(', ')}`
    printFigures(figures)
  })

  const victim = () => cluster.host(VICTIM)
  const others = () => cluster.hosts.filter((h) => h.index !== VICTIM)
  const generations = (states) => states.map((state) => state.details.find((d) => d.name === victimName)?.generation)
  let oldGenerations

  // 'old' from the victim's name, received by an observer after the kill.
  const oldComebacks = () => others().flatMap((h) => h.events
    .filter((e) => e.event === 'update' && e.peer === victimName && e.key === 'k' && e.value === 'old' && e.t >= killedAt)
    .map((e) => `${h.label} got k='old' ${e.t - killedAt} ms after the kill`))

  step('forms', `the ${COUNT} hosts form one cluster, each named by its own address`, async () => {
    const wrong = misnamedHosts(cluster.hosts)
    assert.deepEqual(wrong, [], `hosts named wrongly: ${wrong.join('; ')}`)
    await cluster.waitUntil('the cluster to form', FORM_TIMEOUT_MS, cluster.membership())
    figures.convergeMs = Date.now() - lastStart
  })

  step('old', `k = 'old' written on ${hostName(VICTIM)} reaches every host`, async () => {
    const at = await victim().set('k', 'old')
    await cluster.waitUntil("'old' to reach every host", SPREAD_TIMEOUT_MS,
      cluster.holding(cluster.indices, [[VICTIM, 'k', 'old']]))
    figures.oldSpreadMs = cluster.spreadMs(VICTIM, 'k', 'old', at)
    oldGenerations = generations(await cluster.states())
  })

  step('restart', `after SIGKILL and a restart on the same port, k = 'new' reaches every host`, async () => {
    killedAt = Date.now()
    const exit = await victim().kill()
    assert.equal(exit.signal, 'SIGKILL', `${hostName(VICTIM)} ended with ${JSON.stringify(exit)}`)
    const started = await victim().start()
    figures.restartMs = started.t - killedAt
    assert.equal(started.peer_name, victimName, 'the fresh process has the same name as the killed one')
    const at = await victim().set('k', 'new')
    await cluster.waitUntil("'new' to reach every host and full membership", RESTART_TIMEOUT_MS, (states) => {
      const v = cluster.holding(cluster.indices, [[VICTIM, 'k', 'new']])(states)
      const m = cluster.membership()(states)
      return v === true && m === true ? true : [v, m].filter((x) => x !== true).join(' | ')
    })
    figures.newSpreadMs = cluster.spreadMs(VICTIM, 'k', 'new', at, others())
    figures.recoveredMs = Date.now() - killedAt
  })

  step('stays-new', `'new' is never replaced by the previous incarnation's 'old' (${STABLE_ROUNDS} gossip rounds)`, async () => {
    const until = Date.now() + STABLE_ROUNDS * GOSSIP_INTERVAL
    let polls = 0
    for (;;) {
      const states = await cluster.states()
      polls++
      const wrong = []
      for (const [k, state] of states.entries()) {
        const value = state.values[victimName]?.k
        if (value !== 'new') wrong.push(`${hostName(k + 1)} holds k=${JSON.stringify(value)}`)
      }
      assert.deepEqual(wrong, [], `'new' was replaced ${Date.now() - killedAt} ms after the kill`)
      assert.deepEqual(oldComebacks(), [], "the old incarnation's value came back")
      if (Date.now() >= until) break
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
    figures.stablePolls = polls
    figures.stableRounds = STABLE_ROUNDS
    const states = await cluster.states()
    assert.equal(cluster.membership()(states), true, 'membership after the stable window')
    // Every observer knows the victim under a newer generation than before the kill.
    const now = generations(states)
    const stale = others().filter((h) => !(now[h.index - 1] > oldGenerations[h.index - 1]))
      .map((h) => `${h.label}: generation ${now[h.index - 1]}, before the kill ${oldGenerations[h.index - 1]}`)
    assert.deepEqual(stale, [], 'observers still on the old generation')
  })
})
