#!/usr/bin/env node
// The Arith example's Node.js client: a unary Add, a server-streaming Range and a bidi Accumulate.
// Plain @grpc/grpc-js application code that knows nothing about kuberpc; prints one JSON line, exits 1 on any error.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPLICA_HEADER = 'x-replica';

function options() {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: '127.0.0.1:15001' },
      authority: { type: 'string' },
      proto: { type: 'string', default: path.join(__dirname, '..', '..', '..', 'proto', 'arith.proto') },
      timeout: { type: 'string', default: '5' },
    },
    strict: true,
  });
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new Error(`--timeout ${values.timeout} is not a positive number of seconds`);
  return { ...values, timeout };
}

function makeClient(opts) {
  // longs: Number keeps int64 readable in JSON; the example's values are far below 2^53.
  const definition = protoLoader.loadSync(opts.proto, { keepCase: true, longs: Number, defaults: true });
  const { arith } = grpc.loadPackageDefinition(definition);
  const channelOptions = opts.authority ? { 'grpc.default_authority': opts.authority } : {};
  return new arith.Arith(opts.target, grpc.credentials.createInsecure(), channelOptions);
}

function deadline(opts) {
  return { deadline: Date.now() + opts.timeout * 1000 };
}

// Resolves with the call's x-replica initial metadata; '' when the server sent none.
function replicaOf(call) {
  return new Promise((resolve) => {
    call.on('metadata', (md) => resolve(String(md.get(REPLICA_HEADER)[0] ?? '')));
    call.on('status', () => resolve(''));
  });
}

async function add(client, opts, a, b) {
  let call;
  const reply = new Promise((resolve, reject) => {
    call = client.Add({ a, b }, new grpc.Metadata(), deadline(opts), (err, r) => (err ? reject(err) : resolve(r)));
  });
  const replica = replicaOf(call);
  return { value: (await reply).c, replica: await replica };
}

async function range(client, opts, a, b) {
  const call = client.Range({ a, b }, new grpc.Metadata(), deadline(opts));
  const replica = replicaOf(call);
  const values = await new Promise((resolve, reject) => {
    const out = [];
    call.on('data', (r) => out.push(r.c));
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });
  return { value: values, replica: await replica };
}

// Writes one message, waits for its reply, then the next: the relay must pass messages through one by one.
async function accumulate(client, opts, pairs) {
  const call = client.Accumulate(new grpc.Metadata(), deadline(opts));
  const replica = replicaOf(call);
  const pending = [];
  const arrived = [];
  let failure = null;
  let ended = false;
  const settle = () => {
    while (pending.length && (arrived.length || failure || ended)) {
      const { resolve, reject } = pending.shift();
      if (arrived.length) resolve(arrived.shift());
      else if (failure) reject(failure);
      else resolve(undefined);
    }
  };
  call.on('data', (r) => { arrived.push(r.c); settle(); });
  call.on('error', (e) => { failure = e; settle(); });
  call.on('end', () => { ended = true; settle(); });
  const next = () => new Promise((resolve, reject) => { pending.push({ resolve, reject }); settle(); });

  const values = [];
  for (const [a, b] of pairs) {
    call.write({ a, b });
    const c = await next();
    if (c === undefined) throw new Error('Accumulate: stream ended before every reply arrived');
    values.push(c);
  }
  call.end();
  for (let c = await next(); c !== undefined; c = await next()) values.push(c);
  return { value: values, replica: await replica };
}

function expectEqual(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`${what} returned ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
}

async function main() {
  const opts = options();
  const client = makeClient(opts);
  try {
    const sum = await add(client, opts, 2, 3);
    expectEqual('Add(2, 3)', sum.value, 5);
    const seq = await range(client, opts, 0, 5);
    expectEqual('Range(0, 5)', seq.value, [0, 1, 2, 3, 4]);
    const acc = await accumulate(client, opts, [[1, 1], [2, 2], [3, 3]]);
    expectEqual('Accumulate((1,1), (2,2), (3,3))', acc.value, [2, 6, 12]);
    console.log(JSON.stringify({
      add: sum.value,
      range: seq.value,
      accumulate: acc.value,
      replicas: { Add: sum.replica, Range: seq.replica, Accumulate: acc.replica },
    }));
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const code = err && err.code !== undefined && grpc.status[err.code] ? ` (${grpc.status[err.code]})` : '';
  console.error(`arith node client: ${err && err.message ? err.message : err}${code}`);
  process.exitCode = 1;
});
