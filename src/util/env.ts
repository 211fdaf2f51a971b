/** Whether a switch in the environment is turned off: "0", "off", "false" or "no" (any case). Unset is on. */
export function envOff(name: string, env: NodeJS.ProcessEnv = process.env): boolean {
  return ['0', 'off', 'false', 'no'].includes(String(env[name] ?? '').toLowerCase());
}
