// The clients generated from proto/ (buf.gen.yaml) calling a real auth server over
// gRPC-Web, as a page does (@connectrpc/connect-web's transport, on fetch). The Rust test
// `grpc_web::the_generated_web_client_calls_auth_over_grpc_web` starts the server, runs
// `buf generate` and passes its address in SWITCHBOARD_AUTH_URL.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "../../gen/switchboard/auth/v1/auth_pb.js";

const baseUrl = process.env.SWITCHBOARD_AUTH_URL;
// Without it (a plain `npm test`) these are skipped; the Rust test insists nothing is.
const skip = baseUrl === undefined && "needs SWITCHBOARD_AUTH_URL (run by the Rust test)";

function auth() {
  return createClient(AuthService, createGrpcWebTransport({ baseUrl }));
}

test("GetJwks answers the published signing keys", { skip }, async () => {
  const jwks = await auth().getJwks({});
  assert.ok(jwks.keys.length > 0, "at least one key");
  for (const key of jwks.keys) {
    assert.equal(key.kty, "OKP");
    assert.ok(key.kid.length > 0);
  }
});

test("a call that needs a token fails with UNAUTHENTICATED and a message", { skip }, async () => {
  await assert.rejects(auth().whoAmI({}), (e) => {
    assert.ok(e instanceof ConnectError, String(e));
    assert.equal(e.code, Code.Unauthenticated);
    assert.ok(e.rawMessage.length > 0, "a message a person can act on");
    return true;
  });
});

test("bad input gets INVALID_ARGUMENT naming the field", { skip }, async () => {
  await assert.rejects(auth().register({ username: "", password: "" }), (e) => {
    assert.equal(e.code, Code.InvalidArgument, e.message);
    assert.match(e.rawMessage, /username/);
    return true;
  });
});
