'use strict'
// Scenarios 1 and 2: six hosts, no `address` option, seeded by host name or by IP. Each host
// must call itself by its own 10.231.0.x address (never 127.0.0.1), the cluster must form, and a
// write must reach everyone.

const { describe, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { Network, unsupportedReason } = require('./netns')
const { Cluster, stepper, addressOf, printFigures, misnamedHosts, hostName } = require('./cluster')

const COUNT = 6
const FORM_TIMEOUT_MS = 20000
const SPREAD_TIMEOUT_MS = 10000

function namingScenario({ scenario, title, seedsFor, seedNode }) {
  const skip = unsupportedReason()
  describe(title, { skip: skip ?? false }, () => {
    const figures = { scenario, hosts: COUNT, gossipInterval: 1000, status: 'incomplete', convergeMs: null, spreadMs: null }
    const failures = []
    let network
    let cluster
    let lastStart

    before(async () => {
      network = new Network(COUNT).setup()
      cluster = new Cluster(COUNT, (i) => ({ seeds: seedsFor(i) }))
      const begin = Date.now()
      lastStart = await cluster.start()
      figures.startMs = lastStart - begin
      figures.names = Object.fromEntries(cluster.hosts.map((h) => [h.label, h.peerName]))
    })

    after(async () => {
      await cluster?.close()
      network?.teardown()
      figures.status = failures.length === 0 ? 'ok' : `failed: ${failures.join(', ')}`
      printFigures(figures)
    })

    const step = stepper(failures)

    step('names', 'every host is named by its own 10.231.0.x address', () => {
      const wrong = misnamedHosts(cluster.hosts)
      assert.deepEqual(wrong, [], `hosts named wrongly: ${wrong.join('; ')}`)
    })

    if (seedNode !== undefined) {
      step('seed-name', `the seed node (${hostName(seedNode)}, no seeds of its own) is named by its routable address`, () => {
        const name = cluster.host(seedNode).peerName
        assert.equal(name, addressOf(seedNode), `${hostName(seedNode)} calls itself ${name}`)
      })
    }

    step('forms', `the cluster forms: every host sees the ${COUNT - 1} others live`, async () => {
      const { ms } = await cluster.waitUntil('the cluster to form', FORM_TIMEOUT_MS, cluster.membership())
      figures.convergeMs = Date.now() - lastStart
      figures.convergePollMs = ms
    })

    step('spread', 'a value written on one host reaches all the others', async () => {
      const writer = COUNT
      const value = `hello from ${hostName(writer)}`
      const at = await cluster.host(writer).set('greeting', value)
      await cluster.waitUntil(`${hostName(writer)}'s greeting to reach every host`, SPREAD_TIMEOUT_MS,
        cluster.holding(cluster.indices, [[writer, 'greeting', value]]))
      figures.spreadMs = cluster.spreadMs(writer, 'greeting', value, at)
    })

    step('no-loopback', 'no host is ever named 127.0.0.1 (or anything but a host address) by any host', async () => {
      await cluster.states()
      const strange = cluster.strangeNames()
      figures.strangeNames = strange.map((s) => s.name)
      const loopback = strange.filter((s) => s.loopback)
      assert.deepEqual(loopback.map((s) => s.name), [],
        `loopback names seen: ${loopback.map((s) => `${s.name} (in ${s.seenIn.join('; ')})`).join(' | ')}`)
      assert.deepEqual(strange.map((s) => s.name), [],
        `names that are no host's address: ${strange.map((s) => `${s.name} (in ${s.seenIn.join('; ')})`).join(' | ')}`)
    })
  })
}

module.exports = { namingScenario }
