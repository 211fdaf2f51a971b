import { initBackend } from '../src/engine/backend.js';
import { setLogMode } from '../src/util/log.js';

// Tests run on whatever backend the machine has (wasm here); PREFOPT_BACKEND overrides.
await initBackend();
// Stage logs would drown the test report; the CLI tests still see them from their children.
setLogMode({ quiet: true });
