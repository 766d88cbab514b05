// The Java stack for tests/test_differential.py: `java -cp DIR Backend SYSTEM`, prints
// "ready PORT". com.sun.net.httpserver, routes matched segment by segment with
// equalsIgnoreCase (Spring's AntPathMatcher with caseSensitive=false), ids read with
// Long.parseLong, a format suffix stripped (Spring's suffix pattern match), cookies split
// on ';' and ',' as RFC 2965 containers do.
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Executors;

public class Backend {
    static String system;

    public static void main(String[] args) throws Exception {
        system = args[0];
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 64);
        server.createContext("/", Backend::handle);
        server.setExecutor(Executors.newFixedThreadPool(4));
        server.start();
        System.out.println("ready " + server.getAddress().getPort());
        System.out.flush();
    }

    static String bare(String s) {
        return s.replaceFirst("\\.[A-Za-z0-9]+$", "");
    }

    static void handle(HttpExchange ex) throws java.io.IOException {
        String route = null;
        Long id = null;
        String host = ex.getRequestHeaders().getFirst("Host");
        host = host == null ? "" : host.toLowerCase(Locale.ROOT).replaceFirst(":[0-9]*$", "");
        if (host.endsWith(".")) host = host.substring(0, host.length() - 1);
        if (host.equals("pay.shop.example")) route = "pay-host";
        List<String> segs = new ArrayList<>();
        for (String s : ex.getRequestURI().getPath().split("/")) if (!s.isEmpty()) segs.add(s);
        if (route == null && segs.size() >= 2 && segs.get(0).equalsIgnoreCase("api")) {
            String second = bare(segs.get(1));
            if (second.equalsIgnoreCase("payment")) route = "payment";
            else if (second.equalsIgnoreCase("cart")) route = "cart";
            else if (segs.get(1).equalsIgnoreCase("orders") && segs.size() >= 3) {
                try {
                    id = Long.parseLong(bare(segs.get(2)));
                    route = "orders";
                } catch (NumberFormatException e) {
                    // not an order id
                }
            }
        }
        StringBuilder cookies = new StringBuilder("{");
        List<String> lines = ex.getRequestHeaders().get("Cookie");
        if (lines != null) {
            for (String line : lines) {
                for (String pair : line.split("[;,]")) {
                    pair = pair.trim();
                    if (pair.isEmpty()) continue;
                    int eq = pair.indexOf('=');
                    String name = eq < 0 ? pair : pair.substring(0, eq).trim();
                    String value = eq < 0 ? "" : pair.substring(eq + 1).trim();
                    if (cookies.length() > 1) cookies.append(',');
                    cookies.append(json(name)).append(':').append(json(value));
                }
            }
        }
        cookies.append('}');
        StringBuilder headers = new StringBuilder("{");
        for (Map.Entry<String, List<String>> e : ex.getRequestHeaders().entrySet()) {
            if (headers.length() > 1) headers.append(',');
            headers.append(json(e.getKey().toLowerCase(Locale.ROOT)))
                .append(':').append(json(String.join(",", e.getValue())));
        }
        headers.append('}');
        String emit = ex.getRequestHeaders().getFirst("X-Emit");
        if (emit != null) {
            String all = new String(Base64.getDecoder().decode(emit), StandardCharsets.UTF_8);
            for (String line : all.split("\n")) ex.getResponseHeaders().add("Set-Cookie", line);
        }
        String body = "{\"stack\":\"java\",\"system\":" + json(system)
            + ",\"route\":" + (route == null ? "null" : json(route))
            + ",\"id\":" + (id == null ? "null" : id.toString())
            + ",\"cookies\":" + cookies + ",\"headers\":" + headers + "}";
        byte[] out = body.getBytes(StandardCharsets.UTF_8);
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(200, out.length);
        try (OutputStream os = ex.getResponseBody()) {
            os.write(out);
        }
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }
}
