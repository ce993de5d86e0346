// Builds dist/: the ES modules and declarations (tsc), then the minified browser bundle of the
// core, dist/roomcast.js.
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { bundle } from './bundle.mjs';

const root = new URL('..', import.meta.url).pathname;
rmSync(`${root}dist`, { recursive: true, force: true });
execFileSync(process.execPath, [`${root}node_modules/typescript/bin/tsc`, '-p', root], { stdio: 'inherit' });
await bundle(`${root}dist/roomcast.js`);
