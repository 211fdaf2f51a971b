import { initBackend } from '../src/engine/backend.js';

// Tests run on whatever backend the machine has (wasm here); PREFOPT_BACKEND overrides.
await initBackend();
