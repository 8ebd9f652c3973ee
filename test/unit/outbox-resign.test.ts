/** What the outbox sends (src/outbox.ts, freshEvent): as stored, or signed again with the key that signs now. */
import { describe, expect, it } from "vitest";
import { freshEvent } from "../../src/outbox.ts";
import { generateSigningJwk, importSigningKey } from "../../src/protocol/keys.ts";
import { signEvent } from "../../src/protocol/sign.ts";

const NOW = 1_796_000_000;
const header = (token: string): { kid: string } => JSON.parse(Buffer.from(token.split(".")[0]!, "base64url").toString()) as { kid: string };

describe("an outboxed event", () => {
  it("goes as stored while its key signs and its lifetime lasts; signed again, same jti, by the current key after a rotation or near its exp", async () => {
    const [old, current] = await Promise.all([generateSigningJwk("alpha", "old", NOW - 7200), generateSigningJwk("alpha", "new", NOW - 60)]).then((jwks) => jwks.map(importSigningKey));
    const claims = { iss: "alpha", aud: "beta", jti: "e1", iat: NOW - 10, exp: NOW + 3600, grp: "g@alpha", rcpt: [{ cid: "bob" }], body: "aGk" };
    const deps = (signer: typeof old) => ({ signingKey: () => signer!, now: () => NOW, eventLifetimeSeconds: 3600, resignWithinSeconds: 300 });
    const byOld = await signEvent(claims, old!);

    expect(await freshEvent(byOld, old!.kid, deps(old!))).toEqual({ token: byOld, resigned: false });
    const rotated = await freshEvent(byOld, old!.kid, deps(current!));
    expect(rotated.resigned).toBe(true);
    expect(header(rotated.token).kid).toBe("alpha#new");
    expect(JSON.parse(Buffer.from(rotated.token.split(".")[1]!, "base64url").toString())).toMatchObject({ jti: "e1", iat: NOW, exp: NOW + 3600 });

    const nearExp = await signEvent({ ...claims, exp: NOW + 100 }, old!);
    expect((await freshEvent(nearExp, old!.kid, deps(old!))).resigned).toBe(true);
  });
});
