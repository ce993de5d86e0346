// The browser bundle of the core: one minified ES module, what `npm run size` measures.
// Members named with a trailing `_` are the SDK's own (private fields and methods, and the
// methods of its internal classes): the minifier shortens them. Nothing else is renamed, so
// the public API, the wire frames and what is stored keep their names.
import { build } from 'esbuild';

export async function bundle(outfile) {
  const result = await build({
    entryPoints: [new URL('../src/index.ts', import.meta.url).pathname],
    bundle: true,
    minify: true,
    format: 'esm',
    target: 'es2020',
    write: Boolean(outfile),
    outfile,
    legalComments: 'none',
    mangleProps: /_$/,
  });
  return result;
}
