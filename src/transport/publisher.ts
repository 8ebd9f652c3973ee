/** Publishing signed events to a destination's inbox (DESIGN §4). */
import { createHash } from "node:crypto";
import type { JetStreamClient, PubAck } from "@nats-io/jetstream";
import { RelayError } from "../errors.ts";

/**
 * `Nats-Msg-Id` is the content hash of the bytes: JetStream dedupes per stream,
 * so an id another homeserver could predict would let it suppress a genuine
 * event, while a hash only ever matches the identical bytes.
 */
export function messageId(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("base64url");
}

export interface Published {
  readonly seq: number;
  readonly duplicate: boolean;
}

/** Waits for JetStream's acknowledgement; a refusal surfaces as `publish_failed`, safe to retry with the same bytes. */
export async function publishEvent(js: JetStreamClient, subject: string, data: Uint8Array, timeoutMs: number): Promise<Published> {
  let ack: PubAck;
  try {
    ack = await js.publish(subject, data, { msgID: messageId(data), timeout: timeoutMs });
  } catch (cause) {
    throw new RelayError("publish_failed", `publish to ${subject} failed: ${(cause as Error).message}`, { cause });
  }
  return { seq: ack.seq, duplicate: ack.duplicate };
}
