<?php
// The PHP stack for tests/test_differential.py, run as `php -S 127.0.0.1:PORT backend.php`
// with JALUR_SYSTEM set. Reports what PHP itself read: $_COOKIE (names folded by PHP),
// $_SERVER's HTTP_* headers, and the route a typical PHP router would pick.
$system = getenv('JALUR_SYSTEM') ?: 'unknown';
$path = rawurldecode(explode('?', $_SERVER['REQUEST_URI'], 2)[0]);
$route = null;
$id = null;
$host = strtolower(rtrim(preg_replace('/:[0-9]*$/', '', $_SERVER['HTTP_HOST'] ?? ''), '.'));
if ($host === 'pay.shop.example') {
    $route = 'pay-host';
}
$segs = array_values(array_filter(explode('/', $path), fn ($s) => $s !== ''));
// A {_format} suffix, as Symfony and Laravel routes take it.
$bare = fn ($s) => preg_replace('/\.[A-Za-z0-9]+$/', '', $s);
if ($route === null && count($segs) >= 2 && strcasecmp($segs[0], 'api') === 0) {
    $second = $bare($segs[1]);
    if (strcasecmp($second, 'payment') === 0) {
        $route = 'payment';
    } elseif (strcasecmp($second, 'cart') === 0) {
        $route = 'cart';
    } elseif (strcasecmp($segs[1], 'orders') === 0 && count($segs) >= 3) {
        $value = filter_var($bare($segs[2]), FILTER_VALIDATE_INT);
        if ($value !== false) {
            $route = 'orders';
            $id = $value;
        }
    }
}
$headers = [];
foreach ($_SERVER as $key => $value) {
    if (strncmp($key, 'HTTP_', 5) === 0) {
        $headers[strtolower(str_replace('_', '-', substr($key, 5)))] = $value;
    }
}
if (isset($_SERVER['HTTP_X_EMIT'])) {
    foreach (explode("\n", base64_decode($_SERVER['HTTP_X_EMIT'])) as $line) {
        header('Set-Cookie: ' . $line, false);
    }
}
header('Content-Type: application/json');
echo json_encode(
    [
        'stack' => 'php',
        'system' => $system,
        'route' => $route,
        'id' => $id,
        'cookies' => (object) $_COOKIE,
        'headers' => (object) $headers,
    ],
    JSON_INVALID_UTF8_SUBSTITUTE
);
