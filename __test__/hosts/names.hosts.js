'use strict'
// Scenario 1: six hosts seeded by host name (node1 by node2, the others by node1), no address
// option. Names come from /etc/netns/<ns>/hosts.
const { namingScenario } = require('./naming')

namingScenario({
  scenario: 'names',
  title: '6 hosts seeded by host name, no address option',
  seedsFor: (i) => [i === 1 ? 'node2:7946' : 'node1:7946'],
})
