// server/routes/login.post.ts (Nuxt 3 / Nitro, Node server)
import { appendResponseHeader, defineEventHandler, readBody, sendRedirect } from "h3";
import { Storefront, StorefrontError } from "geins-broker-client";

const shop = new Storefront({ app: "shop" });

export default defineEventHandler(async (event) => {
  const body = await readBody<{ username?: string; password?: string; remember?: string }>(event);
  try {
    const { setCookie } = await shop.login(event.node.req, {
      username: body?.username,
      password: body?.password,
      remember: body?.remember,
    });
    appendResponseHeader(event, "Set-Cookie", setCookie);
    return sendRedirect(event, "/account", 303);
  } catch (error) {
    if (error instanceof StorefrontError) return error.toResponse();
    throw error;
  }
});
