/**
 * What the SDK reads in a JWT: its `exp`, from the base64url payload, unverified (the server
 * verifies; the client only needs to know when to refresh).
 */

/** `exp` in milliseconds since the epoch, or undefined when the token has none readable. */
export function expiry(jwt: string | undefined): number | undefined {
  try {
    const payload = jwt!.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(payload)).exp;
    return typeof exp === 'number' ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
