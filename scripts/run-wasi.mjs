// Runs a wasm32-wasip1 program in Node.js's V8, the engine Envoy runs
// tollgate.wasm in, with the repository readable (for test fixtures).
// Used by `make bench` for core/examples/flow_cost.rs:
//   node scripts/run-wasi.mjs target/wasm32-wasip1/wasm/examples/flow_cost.wasm [args...]
// and as cargo's runner for the core's tests built for wasm with SIMD
// (`make estimate-simd-check`). Exits with the program's exit code.
import { readFile } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { WASI } from 'node:wasi';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const wasi = new WASI({
  version: 'preview1',
  returnOnExit: false,
  args: [basename(process.argv[2], '.wasm'), ...process.argv.slice(3)],
  env: {},
  preopens: { [root]: root },
});
const module = await WebAssembly.compile(await readFile(process.argv[2]));
// Node returns the code passed to proc_exit rather than exiting with it.
const code = wasi.start(await WebAssembly.instantiate(module, wasi.getImportObject()));
if (typeof code === 'number') process.exitCode = code;
