'use strict'
// Scenario 2: six hosts seeded by IP, no address option; node1 is the seed and has no seeds of
// its own, so nothing tells it which of its addresses the others reach it by.
const { namingScenario } = require('./naming')

namingScenario({
  scenario: 'ip-seeds',
  title: '6 hosts seeded by IP, no address option, a seed node without seeds',
  seedsFor: (i) => (i === 1 ? [] : ['10.231.0.11:7946']),
  seedNode: 1,
})
