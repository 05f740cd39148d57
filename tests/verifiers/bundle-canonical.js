#!/usr/bin/env node
// Print a Sigstore bundle as @sigstore/bundle reads and writes it back: its proto3 JSON form,
// without what the schema does not know. A bundle equal to this is one the schema describes
// field for field.
//
//   node bundle-canonical.js provenance.sigstore.json
'use strict';

const fs = require('node:fs');
const { createRequire } = require('node:module');

const fromVerify = createRequire(require.resolve('@sigstore/verify'));
const { bundleFromJSON, bundleToJSON } = fromVerify('@sigstore/bundle');

if (process.argv.length !== 3) {
  console.error('usage: bundle-canonical.js BUNDLE');
  process.exit(2);
}
const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(process.argv[2], 'utf8')));
console.log(JSON.stringify(bundleToJSON(bundle)));
