// HS256 development tokens for the tests (the SDK itself never signs anything).
import { createHmac } from "node:crypto";

export function mint(user, ttl = 3600, secret = process.env.RTC_JWT_SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: user, iat: now, exp: now + ttl })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
