// The router's JSON API, called with the key the user signed in with.

// This module is served at <root>/ui/assets/api.js, so the router's root is two levels up
// (which also holds behind a proxy that mounts the router under a prefix).
const ROOT = new URL("../../", import.meta.url);

/** A refused call: its HTTP status and the problem's words. */
export class ApiError extends Error {
  constructor(status, title, detail, retryAfter) {
    super(detail || title || `HTTP ${status}`);
    this.status = status;
    this.title = title;
    this.retryAfter = retryAfter;
  }
}

/** What to tell a person whose call was refused. */
export function explainError(error) {
  if (!(error instanceof ApiError)) return `The router cannot be reached (${error.message}).`;
  if (error.status === 401) return "This API key is not valid: the router did not accept it.";
  if (error.status === 429 && error.retryAfter) {
    return `Too many attempts with bad keys: wait ${error.retryAfter} s and try again.`;
  }
  if (error.status === 403) return `Not allowed: ${error.message}`;
  return `${error.status}: ${error.message}`;
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  async call(method, path) {
    const response = await fetch(new URL(path, ROOT), {
      method,
      headers: { Authorization: `Bearer ${this.key}`, Accept: "application/json" },
      cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      throw new ApiError(
        response.status,
        body && body.title,
        body && body.detail,
        response.headers.get("Retry-After"),
      );
    }
    return body;
  }

  get(path) {
    return this.call("GET", path);
  }

  post(path) {
    return this.call("POST", path);
  }
}
