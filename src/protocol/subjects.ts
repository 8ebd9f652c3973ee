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

/** The sender token of an inbox subject (its last token), as a homeserver name. */
export function senderOfInboxSubject(subject: string): string | undefined {
  const parts = subject.split(".");
  if (parts.length !== 5 || `${parts[0]}.${parts[1]}` !== PREFIX || parts[2] !== "inbox") {
    return undefined;
  }
  return homeserverFromToken(parts[4]!);
}
