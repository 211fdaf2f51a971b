/**
 * A failure caused by the user's input (a file, a row, a field, a flag). The CLI prints its
 * message alone, without a stack, and exits non-zero; anything else is a bug and keeps its stack.
 */
export class UserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UserError';
  }
}

export function fail(message: string): never {
  throw new UserError(message);
}

/** The most specific reason inside a fetch() failure (undici nests it in `cause`). */
export function netReason(e: any): string {
  const c = e?.cause;
  return c?.code ?? c?.errors?.[0]?.code ?? c?.message ?? e?.message ?? String(e);
}
