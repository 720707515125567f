#!/usr/bin/env node
// A second-language client: proves the contract works from Node.js with @grpc/grpc-js.
//
//   node tests/support/node_client.js unix:///path/to/atomizerd.sock "hello"
//
// Loads protos/atomizer/v1/*.proto at run time (no generated code), creates a session,
// sends TEXT and prints every streamed event as one JSON line on stdout. Exits 0 when the
// stream ended after exactly one terminal event (turnCompleted or turnFailed), 1 otherwise.
"use strict";

const path = require("path");
const tools = path.resolve(__dirname, "..", "..", "tools", "node_modules");
const grpc = require(path.join(tools, "@grpc", "grpc-js"));
const protoLoader = require(path.join(tools, "@grpc", "proto-loader"));

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const TERMINAL = new Set(["turn_completed", "turn_failed"]);

function loadServices() {
  const definition = protoLoader.loadSync(
    ["atomizer/v1/session.proto", "atomizer/v1/daemon.proto"],
    // keepCase: snake_case fields as in the .proto; longs as strings (int64 seq); oneofs: the
    // `kind` property names which event it is.
    { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).atomizer.v1;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const [target, text = "hello"] = process.argv.slice(2);
  if (!target) {
    console.error("usage: node_client.js unix:///path/to/atomizerd.sock [TEXT]");
    process.exit(2);
  }
  const v1 = loadServices();
  const sessions = new v1.SessionService(target, grpc.credentials.createInsecure());
  const created = await unary(sessions, "CreateSession", {});
  const sessionId = created.session.session_id;
  console.error(`session ${sessionId}`);

  const call = sessions.SendMessage({ session_id: sessionId, text, request_id: `node-${process.pid}` });
  let terminals = 0;
  call.on("data", (response) => {
    const event = response.event;
    if (TERMINAL.has(event.kind)) terminals += 1;
    console.log(JSON.stringify(event));
  });
  call.on("error", (err) => {
    console.error(`SendMessage failed: ${err.code} ${err.details}`);
    process.exit(1);
  });
  call.on("end", () => {
    sessions.close();
    process.exit(terminals === 1 ? 0 : 1);
  });
}

main().catch((err) => {
  console.error(`error: ${err.code ?? ""} ${err.details ?? err.message}`);
  process.exit(1);
});
