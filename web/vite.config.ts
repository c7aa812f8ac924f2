import { defineConfig } from "vite";

// `npm run dev`: Vite serves the console with hot reload and passes the grpc-web calls
// (paths `/crm.<svc>.v1.<Service>/<Method>`) to a running gateway
// (`python -m crm_web serve ...`, default http://127.0.0.1:8080; CRM_WEB_GATEWAY overrides).
const gateway = process.env.CRM_WEB_GATEWAY ?? "http://127.0.0.1:8080";

export default defineConfig({
  build: { outDir: "dist", emptyOutDir: true, sourcemap: true },
  server: { proxy: { "^/crm\\.[a-z]+\\.v1\\.": { target: gateway } } },
});
