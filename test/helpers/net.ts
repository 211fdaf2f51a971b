import * as http from 'node:http';

/** A loopback port nothing listens on. */
export async function freePort(): Promise<number> {
  const s = http.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as any).port;
  await new Promise((r) => s.close(r));
  return port;
}

