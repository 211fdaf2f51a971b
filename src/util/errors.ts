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
