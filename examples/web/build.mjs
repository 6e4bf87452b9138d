// Builds the browser client into dist/: index.html, app.js, app.css.
// `node build.mjs --watch` rebuilds on change.
import { context, build } from 'esbuild';
import { copyFile, mkdir } from 'node:fs/promises';

const options = {
  entryPoints: { app: 'src/main.js' },
  bundle: true,
  format: 'esm',
  target: ['chrome110', 'firefox115', 'safari16'],
  outdir: 'dist',
  minify: true,
  sourcemap: true,
  legalComments: 'linked',
  logLevel: process.argv.includes('--quiet') ? 'warning' : 'info',
};

await mkdir('dist', { recursive: true });
await copyFile('index.html', 'dist/index.html');
if (process.argv.includes('--watch')) {
  await (await context(options)).watch();
} else {
  await build(options);
}
