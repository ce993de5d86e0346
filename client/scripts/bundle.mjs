// The browser bundle of the core: one minified ES module, what `npm run size` measures.
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
  });
  return result;
}
