// A Node.js client of gradcheck-svc, written from protos/ alone (@grpc/grpc-js + @grpc/proto-loader).
//
//   node client.js 127.0.0.1:50051
//
// (a) checks the three seed examples as expressions (Check);
// (b) checks a JavaScript function with a hand-written gradient through CheckExternal: the server
//     sends batches of points and cotangents, this process answers with its own values and
//     vector-Jacobian products. The correct gradient passes; one with a planted bug fails and the
//     report names the element;
// (c) sends requests the server must refuse and reads each refusal as a program would: the gRPC
//     status code, then the google.rpc.Status in the `grpc-status-details-bin` trailer (ErrorInfo's
//     stable reason, BadRequest's field, QuotaFailure's limit), decoded with protobufjs from the
//     vendored protos/google/rpc/*.proto. Exit status 0 when every outcome is the expected one.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("gradcheck_svc/v1/gradcheck.proto", {
  includeDirs: [PROTOS], // google/rpc/*.proto are vendored there; google/protobuf ships with proto-loader
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { GradcheckService } = grpc.loadPackageDefinition(definition).gradcheck_svc.v1;

// ------------------------------------------------------------------------------------ tensors
// The wire format: little-endian, row-major; this example uses float64 throughout.

function tensor(values, shape) {
  const data = Buffer.alloc(8 * values.length);
  values.forEach((v, i) => data.writeDoubleLE(v, 8 * i));
  return { dtype: "DTYPE_FLOAT64", shape, data };
}

function values(t) {
  if (t.dtype !== "DTYPE_FLOAT64") throw new Error(`expected float64, got ${t.dtype}`);
  const out = [];
  for (let i = 0; i < t.data.length; i += 8) out.push(t.data.readDoubleLE(i));
  return out;
}

// Split a batched tensor (B, ...rest) into B flat arrays.
function rows(t) {
  const flat = values(t);
  const batch = t.shape[0];
  const size = flat.length / batch;
  return Array.from({ length: batch }, (_, b) => flat.slice(b * size, (b + 1) * size));
}

function batched(items, shape) {
  return tensor(items.flat(), [items.length, ...shape]);
}

// ------------------------------------------------------------------------------------ (a) seeds

function check(client, expression, inputs) {
  const point = { tensors: Object.entries(inputs).map(([name, v]) => ({ name, tensor: tensor([v], []) })) };
  const request = { function: { expression }, explicit_points: { points: [point] }, log_tag: "node-seed" };
  return new Promise((resolve, reject) =>
    client.Check(request, { deadline: Date.now() + 60000 }, (err, response) =>
      err ? reject(err) : resolve(response.reports[0]),
    ),
  );
}

const SEEDS = [
  { expression: "x**2", inputs: { x: 9 }, expect: { x: 18 } },
  { expression: "sin(x / 2**1.5)", inputs: { x: 100 }, expect: { x: -0.2469 } },
  { expression: "u*v + u**2 + v**3", inputs: { u: 2, v: 4 }, expect: { u: 8, v: 50 } },
];

async function seeds(client) {
  let good = true;
  for (const seed of SEEDS) {
    const report = await check(client, seed.expression, seed.inputs);
    const grads = Object.fromEntries(report.pairs.map((p) => [p.input, p.analytic.values[0]]));
    const right = Object.entries(seed.expect).every(([k, v]) => Math.abs(grads[k] - v) < 5e-5);
    good = good && report.ok && right;
    const shown = Object.entries(grads)
      .map(([k, v]) => `d/d${k} = ${Number(v.toPrecision(6))}`)
      .join(", ");
    console.log(`seed ${seed.expression} at ${JSON.stringify(seed.inputs)}: ${shown} ok=${report.ok}`);
  }
  return good;
}

// ------------------------------------------------------------------------------------ (b) our own function

// y = tanh(W x + b): W is 2 x 3 (row-major), x has 3 elements, b has 2.
const SHAPES = { W: [2, 3], x: [3], b: [2] };
const POINT = { W: [0.3, -0.7, 0.2, 0.5, 0.1, -0.4], x: [1.5, -0.25, 0.8], b: [0.05, -0.1] };

function layer(W, x, b) {
  return [0, 1].map((i) => Math.tanh(W[3 * i] * x[0] + W[3 * i + 1] * x[1] + W[3 * i + 2] * x[2] + b[i]));
}

// The hand-written vector-Jacobian product: cotangent c (2) -> gradients for W, x, b.
function layerVjp(c, W, x, b, planted) {
  const y = layer(W, x, b);
  const d = [0, 1].map((i) => c[i] * (1 - y[i] * y[i]));
  const gW = [];
  for (let i = 0; i < 2; i++) {
    for (let j = 0; j < 3; j++) {
      // The planted bug: one weight's gradient reads the wrong input (x[1] instead of x[2]).
      const xj = planted && i === 1 && j === 2 ? x[1] : x[j];
      gW.push(d[i] * xj);
    }
  }
  const gx = [0, 1, 2].map((j) => W[j] * d[0] + W[3 + j] * d[1]);
  return { W: gW, x: gx, b: d };
}

function checkExternal(client, name, planted) {
  return new Promise((resolve, reject) => {
    const call = client.CheckExternal({ deadline: Date.now() + 120000 });
    const stats = { points: 0, cotangents: 0 };
    call.on("data", (message) => {
      switch (message.kind) {
        case "evaluate": {
          // One answer for the whole batch: evaluate every point of it.
          const ins = Object.fromEntries(message.evaluate.inputs.map((t) => [t.name, rows(t.tensor)]));
          const ys = ins.W.map((_, k) => layer(ins.W[k], ins.x[k], ins.b[k]));
          stats.points += ys.length;
          const outputs = [{ name: "output", tensor: batched(ys, [2]) }];
          call.write({ values: { sequence: message.evaluate.sequence, outputs } });
          break;
        }
        case "vjp": {
          const cots = rows(message.vjp.cotangents[0].tensor);
          const grads = cots.map((c) => layerVjp(c, POINT.W, POINT.x, POINT.b, planted));
          stats.cotangents += cots.length;
          const tensors = ["W", "x", "b"].map((n) => ({ name: n, tensor: batched(grads.map((g) => g[n]), SHAPES[n]) }));
          call.write({ products: { sequence: message.vjp.sequence, tensors } });
          break;
        }
        case "report":
          call.end();
          resolve({ report: message.report, stats });
          break;
        default:
          call.write({ failure: { sequence: 0, message: `this client cannot answer ${message.kind}` } });
      }
    });
    call.on("error", reject);
    const point = { tensors: ["W", "x", "b"].map((n) => ({ name: n, tensor: tensor(POINT[n], SHAPES[n]) })) };
    call.write({ start: { function: name, point, log_tag: "node-external" } });
  });
}

function describe({ report, stats }) {
  const lines = [`${report.function}: ok=${report.ok} (${stats.points} points, ${stats.cotangents} cotangents evaluated here)`];
  for (const p of report.pairs) {
    lines.push(`  d ${p.output} / d ${p.input}: ${p.status} (${p.failed_count}/${p.checked_count} failed)`);
    if (p.status === "STATUS_FAIL") {
      for (const e of p.worst.slice(0, 3)) {
        lines.push(
          `    ${p.output}[${e.output_index.join(", ")}] / ${p.input}[${e.input_index.join(", ")}]: ` +
            `analytic ${e.analytic.toPrecision(6)}, numeric ${e.numeric.toPrecision(6)}`,
        );
      }
    }
  }
  return lines.join("\n");
}

// ------------------------------------------------------------------------------------ (c) refusals

// google.rpc.Status and its detail messages, from the same vendored protos (google/protobuf/*.proto
// are bundled with protobufjs).
function errorTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => path.join(PROTOS, target);
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  return root;
}

// What a program branches on: the status code's name, ErrorInfo.reason, the BadRequest fields and
// the QuotaFailure subjects.
function readRefusal(err, types) {
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  const out = { code: codeName, reason: "", fields: [], limits: [] };
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return out;
  const status = types.lookupType("google.rpc.Status").decode(raw);
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const detail = types.lookupType(name).decode(any.value);
    if (name === "google.rpc.ErrorInfo") out.reason = detail.reason;
    if (name === "google.rpc.BadRequest") out.fields.push(...detail.field_violations.map((v) => v.field));
    if (name === "google.rpc.QuotaFailure") out.limits.push(...detail.violations.map((v) => v.subject));
  }
  return out;
}

const X9 = { tensors: [{ name: "x", tensor: tensor([9], []) }] };
const REFUSALS = [
  {
    what: "unknown registered function",
    request: { function: { registered: { name: "os.system" } }, explicit_points: { points: [X9] } },
    expect: { code: "NOT_FOUND", reason: "FUNCTION_NOT_FOUND" },
  },
  {
    what: "data shorter than its shape",
    request: {
      function: { expression: "x**2" },
      explicit_points: { points: [{ tensors: [{ name: "x", tensor: { dtype: "DTYPE_FLOAT64", shape: [3], data: Buffer.alloc(7) } }] }] },
    },
    expect: { code: "INVALID_ARGUMENT", reason: "REQUEST_INVALID", field: "explicit_points.points[0].tensors[0].tensor.data" },
  },
  {
    what: "dtype left unset",
    request: {
      function: { expression: "x**2" },
      explicit_points: { points: [{ tensors: [{ name: "x", tensor: { shape: [], data: Buffer.alloc(8) } }] }] },
    },
    expect: { code: "INVALID_ARGUMENT", reason: "REQUEST_INVALID", field: "explicit_points.points[0].tensors[0].tensor.dtype" },
  },
  {
    what: "an expression that reaches for Python",
    request: { function: { expression: "__import__('os').system('true')" }, explicit_points: { points: [X9] } },
    expect: { code: "INVALID_ARGUMENT", reason: "EXPRESSION_INVALID", field: "function.expression" },
  },
  {
    what: "a shape beyond the server's limit",
    request: { function: { expression: "sum(x)" }, sampling: { inputs: [{ name: "x", shape: [1e9] }] } },
    expect: { code: "RESOURCE_EXHAUSTED", reason: "LIMIT_EXCEEDED", limit: "max_tensor_elements" },
  },
];

function refused(client, request) {
  return new Promise((resolve, reject) =>
    client.Check(request, { deadline: Date.now() + 30000 }, (err) =>
      err ? resolve(err) : reject(new Error("the server accepted a request it must refuse")),
    ),
  );
}

async function refusals(client) {
  const types = errorTypes();
  let good = true;
  for (const { what, request, expect } of REFUSALS) {
    const got = readRefusal(await refused(client, request), types);
    const right =
      got.code === expect.code &&
      got.reason === expect.reason &&
      (!expect.field || got.fields.includes(expect.field)) &&
      (!expect.limit || got.limits.includes(expect.limit));
    good = good && right;
    const where = [...got.fields, ...got.limits].join(", ");
    console.log(`refused ${what}: ${got.code} ${got.reason}${where ? ` (${where})` : ""}${right ? "" : " UNEXPECTED"}`);
  }
  return good;
}

// ------------------------------------------------------------------------------------ main

async function main() {
  const target = process.argv[2] || "127.0.0.1:50051";
  const client = new GradcheckService(target, grpc.credentials.createInsecure());
  try {
    const seedsOk = await seeds(client);
    const correct = await checkExternal(client, "js_layer", false);
    console.log(describe(correct));
    const buggy = await checkExternal(client, "js_layer_planted_bug", true);
    console.log(describe(buggy));
    // The bug is in d y[1] / d W[1, 2]: exactly that element must be blamed, and nothing else.
    const failing = buggy.report.pairs.filter((p) => p.status === "STATUS_FAIL");
    const named =
      failing.length === 1 &&
      failing[0].input === "W" &&
      failing[0].worst.length === 1 &&
      failing[0].worst[0].input_index.join(",") === "1,2" &&
      failing[0].worst[0].output_index.join(",") === "1";
    const refusalsOk = await refusals(client);
    const good = seedsOk && correct.report.ok && !buggy.report.ok && named && refusalsOk;
    console.log(good ? "node client: all outcomes as expected" : "node client: UNEXPECTED OUTCOME");
    process.exitCode = good ? 0 : 1;
  } catch (err) {
    console.error(`node client failed: ${err.code !== undefined ? `code ${err.code}: ` : ""}${err.message}`);
    process.exitCode = 2;
  } finally {
    client.close();
  }
}

main();
