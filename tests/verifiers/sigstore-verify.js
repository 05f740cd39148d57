#!/usr/bin/env node
// Verify buildcell's provenance.sigstore.json with @sigstore/verify, offline, against the
// builder's public key: no transparency log, no timestamp authority, no network.
//
//   npm install @sigstore/verify
//   node sigstore-verify.js --key buildcell.pub --bundle provenance.sigstore.json [ARTIFACT...]
//
// Exit 0 and one line "verified ..." when the signature verifies with the key, the payload is
// an in-toto statement of SLSA provenance v1, and each ARTIFACT's sha256 is a subject's;
// else exit 1 and one line saying why (2 for bad usage).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const { createRequire } = require('node:module');

const { Verifier, toSignedEntity, toTrustMaterial } = require('@sigstore/verify');
// The copies @sigstore/verify itself uses, wherever npm put them.
const fromVerify = createRequire(require.resolve('@sigstore/verify'));
const { bundleFromJSON } = fromVerify('@sigstore/bundle');
const { PublicKeyDetails } = fromVerify('@sigstore/protobuf-specs');

const PAYLOAD_TYPE = 'application/vnd.in-toto+json';
const STATEMENT_TYPE = 'https://in-toto.io/Statement/v1';
const PREDICATE_TYPE = 'https://slsa.dev/provenance/v1';

function usage(message) {
  console.error(`sigstore-verify: ${message}`);
  console.error('usage: sigstore-verify.js --key PUB --bundle FILE [ARTIFACT...]');
  process.exit(2);
}

function parseArgs(argv) {
  const args = { artifacts: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--key' || argv[i] === '--bundle') {
      if (i + 1 >= argv.length) usage(`${argv[i]} needs a value`);
      args[argv[i].slice(2)] = argv[++i];
    } else if (argv[i].startsWith('--')) {
      usage(`unknown option ${argv[i]}`);
    } else {
      args.artifacts.push(argv[i]);
    }
  }
  if (!args.key || !args.bundle) usage('--key and --bundle are required');
  return args;
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function main() {
  const args = parseArgs(process.argv.slice(2));

  // buildcell's keyid: "sha256:" + hex SHA-256 of the key's DER SubjectPublicKeyInfo. The
  // bundle names its key by this hint; the trust material maps the hint to the key.
  const der = crypto
    .createPublicKey(fs.readFileSync(args.key))
    .export({ type: 'spki', format: 'der' });
  const keyid = `sha256:${sha256(der)}`;
  const trustMaterial = toTrustMaterial(
    { certificateAuthorities: [], timestampAuthorities: [], tlogs: [], ctlogs: [] },
    { [keyid]: { rawBytes: der, keyDetails: PublicKeyDetails.PKIX_ED25519 } }
  );
  // A self-managed key and an offline bundle: no log entries, no timestamps to require.
  const verifier = new Verifier(trustMaterial, {
    tlogThreshold: 0,
    ctlogThreshold: 0,
    timestampThreshold: 0,
  });

  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(args.bundle, 'utf8')));
  verifier.verify(toSignedEntity(bundle));

  // @sigstore/verify checks the signature; what was signed is for the caller to check.
  if (bundle.content.$case !== 'dsseEnvelope') throw new Error('the bundle holds no DSSE envelope');
  const envelope = bundle.content.dsseEnvelope;
  if (envelope.payloadType !== PAYLOAD_TYPE) {
    throw new Error(`payloadType ${JSON.stringify(envelope.payloadType)} is not ${PAYLOAD_TYPE}`);
  }
  const statement = JSON.parse(envelope.payload.toString('utf8'));
  if (statement._type !== STATEMENT_TYPE) throw new Error(`_type is not ${STATEMENT_TYPE}`);
  if (statement.predicateType !== PREDICATE_TYPE) {
    throw new Error(`predicateType is not ${PREDICATE_TYPE}`);
  }
  const subjects = new Set((statement.subject || []).map((s) => s.digest && s.digest.sha256));
  for (const artifact of args.artifacts) {
    const digest = sha256(fs.readFileSync(artifact));
    if (!subjects.has(digest)) throw new Error(`${artifact}: sha256 ${digest} is not a subject`);
  }
  const checked = args.artifacts.length ? `, ${args.artifacts.length} artifact(s) matched` : '';
  console.log(`verified: signed by ${keyid}, ${PREDICATE_TYPE}${checked}`);
}

try {
  main();
} catch (e) {
  console.log(`not verified: ${e.code ? `${e.code}: ` : ''}${e.message}`);
  process.exit(1);
}
