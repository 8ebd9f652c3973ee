/** Subjects and stream names of DESIGN §4 (wire). Pure. */
import { homeserverFromToken, subjectToken } from "./names.ts";

const PREFIX = "fedrelay.v1";

export function inboxSubject(destination: string, sender: string): string {
  return `${PREFIX}.inbox.${subjectToken(destination)}.${subjectToken(sender)}`;
}

export function inboxWildcard(destination: string): string {
  return `${PREFIX}.inbox.${subjectToken(destination)}.*`;
}

export function reportSubject(originalSender: string, destination: string): string {
  return `${PREFIX}.report.${subjectToken(originalSender)}.${subjectToken(destination)}`;
}

export function inboxStreamName(destination: string): string {
  return `FEDRELAY_IN_${subjectToken(destination)}`;
}

export function reportWildcard(originalSender: string): string {
  return `${PREFIX}.report.${subjectToken(originalSender)}.*`;
}

/** Not wire: the sender's own stream for the reports it receives. */
export function reportStreamName(originalSender: string): string {
  return `FEDRELAY_REPORTS_${subjectToken(originalSender)}`;
}

/** The last token of an inbox or report subject, as a homeserver name: who published it. */
export function senderOfSubject(subject: string, kind: "inbox" | "report"): string | undefined {
  const parts = subject.split(".");
  if (parts.length !== 5 || `${parts[0]}.${parts[1]}` !== PREFIX || parts[2] !== kind) {
    return undefined;
  }
  return homeserverFromToken(parts[4]!);
}

/** Every event of a batch names one of a few subjects: their senders are remembered (up to a bound). */
const inboxSenders = new Map<string, string | undefined>();

export function senderOfInboxSubject(subject: string): string | undefined {
  if (inboxSenders.has(subject)) return inboxSenders.get(subject);
  if (inboxSenders.size >= 10_000) inboxSenders.clear();
  const sender = senderOfSubject(subject, "inbox");
  inboxSenders.set(subject, sender);
  return sender;
}

/**
 * Not wire: a sender's outbox, on the server it connects to (`fanout.outbox`).
 * Its own prefix, so an outboxed event is never also taken by an inbox stream.
 */
export function outboxSubject(destination: string, sender: string): string {
  return `${PREFIX}.outbox.${subjectToken(destination)}.${subjectToken(sender)}`;
}

export function outboxWildcard(sender: string): string {
  return `${PREFIX}.outbox.*.${subjectToken(sender)}`;
}

export function outboxStreamName(sender: string): string {
  return `FEDRELAY_OUT_${subjectToken(sender)}`;
}

/** The destination an outbox subject names. */
export function destinationOfOutboxSubject(subject: string): string | undefined {
  const parts = subject.split(".");
  if (parts.length !== 5 || `${parts[0]}.${parts[1]}` !== PREFIX || parts[2] !== "outbox") return undefined;
  return homeserverFromToken(parts[3]!);
}
