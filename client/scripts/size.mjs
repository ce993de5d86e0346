// The core's size as a browser downloads it: bundled and minified by esbuild, gzipped (level
// 9). Fails over the budget of 5 KB.
import { gzipSync } from 'node:zlib';
import { bundle } from './bundle.mjs';

const BUDGET = 5120;
const { outputFiles } = await bundle();
const minified = outputFiles[0].contents;
const gzipped = gzipSync(minified, { level: 9 }).length;
console.log(`core: ${minified.length} bytes minified, ${gzipped} bytes gzipped (budget ${BUDGET})`);
if (gzipped > BUDGET) {
  console.error(`the core is ${gzipped - BUDGET} bytes over its budget`);
  process.exit(1);
}
