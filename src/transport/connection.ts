/**
 * Connecting to NATS as a tenant does: the one credential the config names,
 * TLS, a reply prefix of its own; and a refusal said in one line naming the
 * server and what to check.
 */
import { connect, credsAuthenticator, errors, nkeyAuthenticator, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node";
import type { RelayConfig } from "../config.ts";
import { RelayError } from "../errors.ts";

type NatsSettings = RelayConfig["nats"];

/** Which setting holds the credential in use, for messages. */
function credentialName(n: NatsSettings): string {
  if (n.nkeySeed !== undefined) return n.nkeySeedFile === undefined ? "nats.nkeySeed" : `nats.nkeySeedFile (${n.nkeySeedFile})`;
  if (n.creds !== undefined) return n.credsFile === undefined ? "nats.creds" : `nats.credsFile (${n.credsFile})`;
  if (n.token !== undefined) return "nats.token";
  if (n.user !== undefined) return `nats.user (${n.user}) and nats.pass`;
  return "no credential (set nats.nkeySeedFile, nats.credsFile, nats.token or nats.user)";
}

export function connectOptions(n: NatsSettings, name: string): NodeConnectionOptions {
  const encoder = new TextEncoder();
  return {
    servers: [...n.servers],
    name,
    // Never give up: a relay that stops reconnecting needs an operator.
    maxReconnectAttempts: -1,
    // nats.js otherwise builds an Error (a stack trace) for every request, so that a timeout
    // can say where it was made: every JetStream publish is a request. Measured (npm run
    // bench:e2e, --cpu-prof, a group of one): 3 % of the owner's CPU. A timeout still says which
    // subject it was for.
    noAsyncTraces: true,
    ...(n.user === undefined ? {} : { user: n.user, pass: n.pass }),
    ...(n.token === undefined ? {} : { token: n.token }),
    ...(n.nkeySeed === undefined ? {} : { authenticator: nkeyAuthenticator(encoder.encode(n.nkeySeed)) }),
    ...(n.creds === undefined ? {} : { authenticator: credsAuthenticator(encoder.encode(n.creds)) }),
    ...(n.tls === undefined ? {} : { tls: { ...n.tls } }),
    ...(n.inboxPrefix === undefined ? {} : { inboxPrefix: n.inboxPrefix }),
  };
}

/** The first connection; its failure is a RelayError (`unavailable`) of one line. */
export async function connectNats(n: NatsSettings, name: string): Promise<NatsConnection> {
  try {
    return await connect(connectOptions(n, name));
  } catch (cause) {
    const where = `NATS ${n.servers.join(", ")}`;
    if (cause instanceof errors.AuthorizationError || /authorization|authentication/i.test((cause as Error).message)) {
      throw new RelayError("unavailable", `${where} refused ${credentialName(n)}: authorization failed`, { cause });
    }
    throw new RelayError("unavailable", `${where}: ${(cause as Error).message}${n.tls === undefined ? "" : " (TLS: check nats.tls)"}`, { cause });
  }
}
